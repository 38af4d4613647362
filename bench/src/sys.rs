//! What the bench reads from and asks of the OS: resource limits, a
//! process's memory and open files (from /proc), host-wide kernel memory.

use std::fs;
use std::io;
use std::path::Path;

use anyhow::{Context, bail};

/// Raises the soft open-file limit to the hard one and returns it. Every
/// bench process calls this first; children inherit the raised limit.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    raise_to_hard(libc::RLIMIT_NOFILE).context("raising RLIMIT_NOFILE")
}

/// Same for locked memory (io_uring rings on older kernels count against it).
pub fn raise_memlock_limit() -> anyhow::Result<u64> {
    raise_to_hard(libc::RLIMIT_MEMLOCK).context("raising RLIMIT_MEMLOCK")
}

fn raise_to_hard(resource: libc::__rlimit_resource_t) -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass; no other memory involved.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Resident memory of process `pid` in bytes: `Rss:` of smaps_rollup (exact,
/// summed from the page tables), else `VmRSS:` of status (may lag by a few
/// pages per thread).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let rollup = Path::new("/proc").join(pid.to_string()).join("smaps_rollup");
    if let Ok(text) = fs::read_to_string(&rollup)
        && let Some(kib) = kib_field(&text, "Rss:")
    {
        return Ok(kib * 1024);
    }
    let status = Path::new("/proc").join(pid.to_string()).join("status");
    let text = fs::read_to_string(&status).with_context(|| format!("reading {}", status.display()))?;
    match kib_field(&text, "VmRSS:") {
        Some(kib) => Ok(kib * 1024),
        None => bail!("no VmRSS in {} (is process {pid} a zombie?)", status.display()),
    }
}

/// Number of open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> anyhow::Result<u64> {
    let dir = Path::new("/proc").join(pid.to_string()).join("fd");
    let entries = fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    Ok(entries.count() as u64)
}

/// Host-wide kernel memory that grows with connections. Both ends of every
/// bench connection live on this host, so deltas cover the client side too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelMem {
    /// `Slab:` of /proc/meminfo (socket objects, io_uring requests, dentries...).
    pub slab_bytes: u64,
    /// `TCP: ... mem` of /proc/net/sockstat: pages charged to TCP buffers.
    pub tcp_buffer_bytes: u64,
    /// `TCP: inuse` of /proc/net/sockstat: TCP sockets in use on the host.
    pub tcp_sockets_inuse: u64,
}

impl KernelMem {
    pub fn read() -> anyhow::Result<KernelMem> {
        let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let slab_kib = kib_field(&meminfo, "Slab:").context("no Slab: in /proc/meminfo")?;
        let sockstat = fs::read_to_string("/proc/net/sockstat").context("reading /proc/net/sockstat")?;
        let tcp =
            sockstat.lines().find_map(|l| l.strip_prefix("TCP:")).context("no TCP: line in /proc/net/sockstat")?;
        let field = |name: &str| -> Option<u64> {
            let mut words = tcp.split_whitespace();
            while let Some(w) = words.next() {
                if w == name {
                    return words.next()?.parse().ok();
                }
            }
            None
        };
        // SAFETY: sysconf only reads a system constant.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        Ok(KernelMem {
            slab_bytes: slab_kib * 1024,
            tcp_buffer_bytes: field("mem").unwrap_or(0) * page,
            tcp_sockets_inuse: field("inuse").unwrap_or(0),
        })
    }
}

/// The number after `name` on the first line that starts with it, in kB
/// as /proc prints it.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// CPU time process `pid` has used so far (user + system, all threads),
/// in seconds: fields 14 and 15 of /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = Path::new("/proc").join(pid.to_string()).join("stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let ticks = stat_cpu_ticks(&text).with_context(|| format!("no utime/stime in {}", path.display()))?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// CPU time process `pid` has used so far, in nanoseconds, as precisely
/// as Linux tells it:
/// - this process: `getrusage(RUSAGE_SELF)` (µs; threads that already
///   exited count, which matters for the push threads joined before a read);
/// - another process: the sum of the first field of
///   /proc/PID/task/*/schedstat (ns of CPU each live thread has run, user +
///   system). Threads that exit during a measurement take their share with
///   them; the servers measured here keep their threads for the whole run.
///
/// Falls back to the clock ticks of /proc/PID/stat (10 ms resolution at
/// 100 Hz: too coarse for CPU per message over a short window).
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    if pid == std::process::id() {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes into the struct we pass; it is zeroed, so
        // valid either way.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0 {
            // SAFETY: zero-initialised above and filled in by getrusage.
            let ru = unsafe { ru.assume_init() };
            let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
            return Ok((us(ru.ru_utime) + us(ru.ru_stime)) * 1000);
        }
    }
    if let Some(ns) = schedstat_ns(pid) {
        return Ok(ns);
    }
    Ok((cpu_seconds(pid)? * 1e9) as u64)
}

/// Sum of the run times (ns) in /proc/PID/task/*/schedstat; `None` when the
/// kernel has no schedstat or the process is gone.
fn schedstat_ns(pid: u32) -> Option<u64> {
    let dir = Path::new("/proc").join(pid.to_string()).join("task");
    let mut total = 0u64;
    let mut any = false;
    for entry in fs::read_dir(&dir).ok()?.flatten() {
        // A thread that exited between the listing and the read just counts nothing.
        let Ok(text) = fs::read_to_string(entry.path().join("schedstat")) else { continue };
        total += schedstat_run_ns(&text)?;
        any = true;
    }
    any.then_some(total)
}

/// The first field of a schedstat line: ns the thread ran on a CPU.
fn schedstat_run_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// utime + stime (clock ticks) from a /proc/PID/stat line. The command
/// name (field 2) may contain spaces and parentheses, so fields are
/// counted after its last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime 14, stime 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time the whole host has spent busy (user, nice, system, irq,
/// softirq, steal; all CPUs), in seconds, from the first line of /proc/stat.
pub fn host_busy_seconds() -> anyhow::Result<f64> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = host_busy_ticks(&text).context("no cpu line in /proc/stat")?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

fn host_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7).copied().unwrap_or(0))
}

/// Restricts thread `tid` (0: the calling thread) to CPU `cpu`. Threads
/// and processes it starts afterwards inherit the mask.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> anyhow::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("CPU {cpu} is beyond the largest CPU set");
    }
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the set we own; cpu is checked below.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads the set we pass, of the size we pass.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pinning thread {tid} to CPU {cpu}"));
    }
    Ok(())
}

/// Restricts every thread process `pid` has now to CPU `cpu` (threads it
/// starts later inherit the mask of the thread that starts them). Returns
/// how many threads were pinned.
pub fn pin_process(pid: u32, cpu: usize) -> anyhow::Result<usize> {
    let dir = Path::new("/proc").join(pid.to_string()).join("task");
    let mut pinned = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<libc::pid_t>().ok()) else { continue };
        // A thread that exited meanwhile cannot be pinned and needs not be.
        if pin_thread(tid, cpu).is_ok() {
            pinned += 1;
        }
    }
    if pinned == 0 {
        bail!("no thread of process {pid} could be pinned to CPU {cpu}");
    }
    Ok(pinned)
}

/// The CPU (0-based) the calling thread may run on, when it is exactly one.
#[cfg(test)]
fn pinned_cpu() -> Option<usize> {
    // SAFETY: as in pin_thread; sched_getaffinity fills the set we pass.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    // SAFETY: CPU_ISSET reads one bit of the set.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    (cpus.len() == 1).then(|| cpus[0])
}

/// Lets the calling thread's timed sleeps wake within about a
/// microsecond (the default slack is 50 µs): open-loop senders pace by
/// sleeping.
pub fn tight_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes the calling thread's
    // timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// Whether stderr is a terminal (progress is redrawn in place only then).
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDERR_FILENO) == 1 }
}

/// Number of CPUs this process may run on.
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_fds() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(open_fds(pid).unwrap() >= 3);
        let k = KernelMem::read().unwrap();
        assert!(k.slab_bytes > 0);
    }

    #[test]
    fn parses_cpu_ticks_after_the_command_name() {
        let stat = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

    #[test]
    fn counts_cpu_in_nanoseconds() {
        assert_eq!(schedstat_run_ns("324176774 71834490 112\n"), Some(324_176_774));
        assert_eq!(schedstat_run_ns(""), None);
        // Burn ~20 ms in this process and in a child: both are seen with
        // better than clock-tick resolution.
        let me = std::process::id();
        let before = cpu_ns(me).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_ns(me).unwrap() > before);
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 5"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let ns = schedstat_ns(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let ns = ns.expect("schedstat of a live child");
        assert!(ns > 0 && !ns.is_multiple_of(1_000_000), "{ns}");
    }

    #[test]
    fn pins_threads_to_one_cpu() {
        // On a thread of its own, so the test runner's threads keep their mask.
        std::thread::spawn(|| {
            pin_thread(0, 0).unwrap();
            assert_eq!(pinned_cpu(), Some(0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn parses_host_busy_ticks() {
        let stat = "cpu  100 5 50 1000 7 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(host_busy_ticks(stat), Some(161));
        assert!(host_busy_seconds().unwrap() > 0.0);
    }

    #[test]
    fn parses_kib_fields() {
        let text = "Rss:               12345 kB\nPss:   1 kB\n";
        assert_eq!(kib_field(text, "Rss:"), Some(12345));
        assert_eq!(kib_field(text, "Swap:"), None);
    }
}
