//! The demos' status lines on stderr: a spinner showing the latest line when stderr is a terminal,
//! otherwise plain lines, every [`EVERY`]th one.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Off a terminal, one status line in this many is printed (and the first).
const EVERY: usize = 10;

pub struct Progress {
    bar: Option<ProgressBar>,
    count: usize,
    start: Instant,
}

impl Progress {
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{spinner} [{elapsed:>4}] {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            count: 0,
            start: Instant::now(),
        }
    }

    /// One status line from a demo.
    pub fn line(&mut self, s: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(s.to_string()),
            None => {
                if self.count % EVERY == 0 {
                    let elapsed = self.start.elapsed().as_secs_f32();
                    // A status line that cannot be written is not worth failing the run for.
                    let _ = writeln!(std::io::stderr().lock(), "[{elapsed:6.1}s] {s}");
                }
            }
        }
        self.count += 1;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
