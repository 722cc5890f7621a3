//! The open-file limit. Every attached tap, program, map and HTTP
//! connection holds file descriptors, and systemd's default soft limit
//! (1024) is far below what a dense node needs; like Go exporters, hvnet
//! raises its soft limit to the hard limit at start.

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (before, after).
pub fn raise_to_hard_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit
        // up to the hard limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// File descriptors one tap's attachment holds (TCX links and what aya
/// keeps with them; measured about 3.4 per tap here), rounded up.
pub const FDS_PER_ATTACH: u64 = 4;
/// Descriptors kept free for everything else: polls read /proc and /sys,
/// netlink dumps, identity reads, HTTP clients.
pub const FD_RESERVE: u64 = 64;

/// Descriptors open in this process now.
pub fn open_fds() -> std::io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// The soft RLIMIT_NOFILE in force.
pub fn soft_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// How many more taps can be attached without eating into the reserve:
/// (that many, open now, the limit).
pub fn attach_budget() -> std::io::Result<(u64, u64, u64)> {
    let open = open_fds()?;
    let limit = soft_limit()?;
    let free = limit.saturating_sub(open).saturating_sub(FD_RESERVE);
    Ok((free / FDS_PER_ATTACH, open, limit))
}

/// Whether an error chain says the process ran out of descriptors.
pub fn is_fd_exhaustion(text: &str) -> bool {
    text.contains("os error 24")
        || text.contains("os error 23")
        || text.contains("Too many open files")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_budget_keeps_the_reserve() {
        let (budget, open, limit) = super::attach_budget().unwrap();
        assert!(open > 0);
        assert!(
            budget * super::FDS_PER_ATTACH + open + super::FD_RESERVE
                <= limit.max(open + super::FD_RESERVE)
        );
        assert!(super::is_fd_exhaustion(
            "opening x: Too many open files (os error 24)"
        ));
        assert!(!super::is_fd_exhaustion("No such device (os error 19)"));
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (before, after) = super::raise_to_hard_limit().unwrap();
        assert!(after >= before);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
