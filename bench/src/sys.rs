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
    fn parses_kib_fields() {
        let text = "Rss:               12345 kB\nPss:   1 kB\n";
        assert_eq!(kib_field(text, "Rss:"), Some(12345));
        assert_eq!(kib_field(text, "Swap:"), None);
    }
}
