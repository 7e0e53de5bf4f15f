//! A capture wrapper around any device: every frame received and sent is written to a pcap file
//! (Ethernet link type, microsecond timestamps), readable by tcpdump, tshark and Wireshark.
//! Written with the `pcap-file` crate.

use std::fs::File;
use std::io::{self, BufWriter};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;

use crate::{Batch, Clock, Device, DeviceInfo, Frame};

/// Snapshot length: whole GSO super-frames fit.
const SNAPLEN: u32 = 262_144;

/// The file behind the pcap writer, shared so that [`Capture::flush`] can reach it.
#[derive(Clone)]
struct SharedFile(Arc<Mutex<BufWriter<File>>>);

impl io::Write for SharedFile {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("capture file lock poisoned"))?
            .write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("capture file lock poisoned"))?
            .flush()
    }
}

/// A device whose traffic, both directions, is also written to a pcap file.
pub struct Capture<D> {
    inner: D,
    writer: Option<PcapWriter<SharedFile>>,
    file: SharedFile,
    clock: Arc<dyn Clock>,
    /// Wall-clock time at the clock's origin.
    origin: Duration,
    written: u64,
    error: Option<String>,
}

impl<D: Device> Capture<D> {
    /// Wraps `inner`, creating (truncating) `path`. Timestamps are wall-clock time, advanced by
    /// `clock` (a simulation's clock gives simulated time from the start of the capture).
    pub fn new(inner: D, path: impl AsRef<Path>, clock: Arc<dyn Clock>) -> io::Result<Self> {
        let file = SharedFile(Arc::new(Mutex::new(BufWriter::new(File::create(path)?))));
        let header = PcapHeader {
            snaplen: SNAPLEN,
            datalink: DataLink::ETHERNET,
            ..PcapHeader::default()
        };
        let writer = PcapWriter::with_header(file.clone(), header).map_err(io::Error::other)?;
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let origin = wall.saturating_sub(clock.now());
        Ok(Capture {
            inner,
            writer: Some(writer),
            file,
            clock,
            origin,
            written: 0,
            error: None,
        })
    }

    fn record<'a>(&mut self, frames: impl Iterator<Item = &'a Frame>) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        let ts = self.origin + self.clock.now();
        for f in frames {
            let data = &f.data()[..f.len().min(SNAPLEN as usize)];
            if let Err(e) = w.write_packet(&PcapPacket::new(ts, f.len() as u32, data)) {
                // A full disk must not stop the data path: stop capturing and say why.
                self.error = Some(e.to_string());
                self.writer = None;
                return;
            }
            self.written += 1;
        }
    }

    /// Frames written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Why capturing stopped, if it did.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Flushes buffered records to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        io::Write::flush(&mut self.file)
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps, flushing the file.
    pub fn into_inner(mut self) -> io::Result<D> {
        self.flush()?;
        Ok(self.inner)
    }
}

impl<D: Device> Device for Capture<D> {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        let before = batch.len();
        let n = self.inner.recv(batch)?;
        self.record(batch.frames()[before..].iter());
        Ok(n)
    }

    fn send(&mut self, frames: &[Frame]) -> io::Result<usize> {
        let n = self.inner.send(frames)?;
        self.record(frames[..n].iter());
        Ok(n)
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.poll_fd()
    }

    fn next_deadline(&self) -> Option<Duration> {
        self.inner.next_deadline()
    }
}
