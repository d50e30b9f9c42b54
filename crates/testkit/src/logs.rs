//! Capturing what a test's services log, to prove that secrets never reach it (BX5).

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Everything logged in this process, at every level, since [`LogCapture::install`].
#[derive(Debug, Clone)]
pub struct LogCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut buffer) = self.0.lock() {
            buffer.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Installs the process-wide subscriber at TRACE, JSON lines with span fields. Call it
    /// first in the test, before anything else installs a subscriber.
    pub fn install() -> Self {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Writer(writer.clone()))
            .try_init()
            .expect("LogCapture::install must be the first subscriber of the test process");
        hafen_platform::telemetry::install_crypto_provider();
        Self { buffer }
    }

    /// What was logged so far.
    pub fn contents(&self) -> String {
        let buffer = self.buffer.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&buffer).into_owned()
    }
}
