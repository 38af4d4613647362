//! `longlink upgrade --pid`: SIGUSR2 to a running node, then its outcome.

use crate::*;

/// How often the outcome file is looked for.
const POLL: Duration = Duration::from_millis(20);

pub(crate) fn upgrade(pid: u32, timeout: Duration) -> anyhow::Result<ExitCode> {
    let path = longlink::upgrade::status_path(pid);
    // An outcome left by an earlier upgrade of a process with this pid.
    let _ = std::fs::remove_file(&path);
    let target = i32::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) with a plain pid and signal number.
    if unsafe { libc::kill(target, libc::SIGUSR2) } != 0 {
        bail!("cannot signal process {pid}: {}", std::io::Error::last_os_error());
    }
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let _ = std::fs::remove_file(&path);
            let outcome: serde_json::Value = serde_json::from_str(&text).context("reading the upgrade outcome")?;
            println!("{outcome}");
            let ok = outcome.get("ok").and_then(serde_json::Value::as_bool) == Some(true);
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        std::thread::sleep(POLL);
    }
    emit(json!({"ok": false, "old_pid": pid, "error": format!("no outcome within {} s", timeout.as_secs())}));
    Ok(ExitCode::from(1))
}
