//! SIGINT, SIGTERM and SIGHUP as a pollable file descriptor (the self-pipe trick).
//!
//! The handler only writes the signal number into a non-blocking pipe; an event loop polls the
//! read end with its other descriptors and calls [`SignalPipe::drain`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

static WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops the byte.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// The read end of the signal pipe.
#[derive(Debug)]
pub struct SignalPipe {
    read: OwnedFd,
}

/// Route `signals` to a new pipe. Call once per process, before starting threads.
pub fn install(signals: &[libc::c_int]) -> io::Result<SignalPipe> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fds were just created and are owned here; the write end lives for the whole
    // process (the handler may run at any time).
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    WRITE_FD.store(fds[1], Ordering::Relaxed);
    for &sig in signals {
        // SAFETY: installing a handler that only calls write(2).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(SignalPipe { read })
}

impl SignalPipe {
    /// The descriptor to poll for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The signals received since the last call (empty if none).
    pub fn drain(&self) -> Vec<libc::c_int> {
        let mut buf = [0u8; 64];
        let mut out = Vec::new();
        loop {
            // SAFETY: reading into a local buffer from a non-blocking fd we own.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            out.extend(buf[..n as usize].iter().map(|&b| libc::c_int::from(b)));
        }
    }
}
