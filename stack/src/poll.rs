//! The I/O edge: drives a [`Stack`] over a [`Device`]. The only module of this crate that makes
//! system calls (the device's, and `poll(2)` to wait).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use subnetstack_ifaces::{Batch, Device};

use crate::Stack;

/// A device with its receive and transmit batches.
#[derive(Debug)]
pub struct Driver<D> {
    dev: D,
    rx: Batch,
    tx: Batch,
}

impl<D: Device> Driver<D> {
    /// Batches of 32 frames sized for the device (transmit buffers hold a super-frame when the
    /// device takes them).
    pub fn new(dev: D) -> Self {
        let (rx, tx) = (dev.info().max_frame(), dev.info().max_tx_frame());
        Driver {
            dev,
            rx: Batch::new(32, rx),
            tx: Batch::new(32, tx),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device, mutable.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// One round: receive a batch into the stack, run its timers if due, and transmit everything
    /// it has queued. Returns the number of frames received.
    pub fn poll(&mut self, stack: &mut Stack, now: Duration) -> io::Result<usize> {
        self.rx.clear();
        let n = self.dev.recv(&mut self.rx)?;
        for f in self.rx.frames() {
            stack.handle_frame(now, f.data(), f.meta);
        }
        if stack.poll_timeout().is_some_and(|t| t <= now) {
            stack.handle_timeout(now);
        }
        self.flush(stack)?;
        Ok(n)
    }

    /// Transmits what the stack has queued (waiting for the device when it pushes back).
    pub fn flush(&mut self, stack: &mut Stack) -> io::Result<()> {
        loop {
            if self.tx.is_empty() && stack.poll_transmit(&mut self.tx) == 0 {
                return Ok(());
            }
            let sent = self.dev.send(self.tx.frames())?;
            self.tx.consume(sent);
            if sent == 0 {
                return Ok(()); // device full: try again next round
            }
        }
    }

    /// Sleeps until the device may have frames, the stack or device has a deadline, or `max`
    /// passes, whichever comes first.
    pub fn wait(&self, stack: &Stack, now: Duration, max: Duration) {
        let deadline = [stack.poll_timeout(), self.dev.next_deadline()]
            .into_iter()
            .flatten()
            .min()
            .map_or(max, |d| d.saturating_sub(now).min(max));
        match self.dev.poll_fd() {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = deadline.as_millis().min(i32::MAX as u128) as libc::c_int;
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut p, 1, ms) };
            }
            None => std::thread::sleep(deadline),
        }
    }
}
