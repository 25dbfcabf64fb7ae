//! Build progress: turns step events into plain timestamped lines (CI, logs), a live indicatif
//! view (a terminal), or nothing (`--quiet`). The only writer to the terminal during a build.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Live view with one line per running step (stderr is a terminal).
    Tty,
    /// One line per event, with the full output of RUN steps.
    Plain,
    /// Nothing but errors.
    Quiet,
}

/// Identifies a step in messages: `[stage 3/7]`.
#[derive(Clone, Debug)]
pub struct StepLabel {
    /// Stage name, or its index.
    pub stage: String,
    /// 1-based step number within the stage (FROM is step 1).
    pub number: usize,
    /// Steps in the stage.
    pub total: usize,
    /// The instruction as written (one line).
    pub text: String,
    /// The instruction's line in the recipe.
    pub line: usize,
}

impl std::fmt::Display for StepLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{} {}/{}] {}",
            self.stage,
            self.number,
            self.total,
            one_line(&self.text, 100)
        )
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let mut t: String = flat.chars().take(max - 3).collect();
        t.push_str("...");
        t
    } else {
        flat
    }
}

/// The progress sink shared by all stages of a build.
pub struct Progress {
    mode: Mode,
    start: Instant,
    multi: Option<MultiProgress>,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    cached: usize,
    built: usize,
}

impl Progress {
    /// A sink in the given mode.
    pub fn new(mode: Mode) -> Progress {
        let multi = (mode == Mode::Tty)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress {
            mode,
            start: Instant::now(),
            multi,
            counts: Mutex::new(Counts::default()),
        }
    }

    fn line(&self, text: &str) {
        match (&self.multi, self.mode) {
            (Some(m), _) => {
                let _ = m.println(text);
            }
            (None, Mode::Plain) => {
                let secs = self.start.elapsed().as_secs_f64();
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "#{secs:>7.3} {text}");
            }
            _ => {}
        }
    }

    /// A general message (a pull, an export).
    pub fn info(&self, text: &str) {
        self.line(text);
    }

    /// A warning, shown in every mode but quiet.
    pub fn warn(&self, text: &str) {
        if self.mode != Mode::Quiet {
            self.line(&format!("WARNING: {text}"));
        }
    }

    /// A step begins.
    pub fn step<'a>(&'a self, label: StepLabel) -> Step<'a> {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if self.mode == Mode::Plain {
            self.line(&label.to_string());
        }
        Step {
            progress: self,
            label,
            start: Instant::now(),
            bar,
            partial: Vec::new(),
        }
    }

    /// The end-of-build summary line.
    pub fn finish(&self, image_id: &str) {
        let c = self
            .counts
            .lock()
            .map(|c| (c.cached, c.built))
            .unwrap_or((0, 0));
        let secs = self.start.elapsed().as_secs_f64();
        self.line(&format!(
            "built {image_id} in {secs:.2}s: {} steps run, {} from cache",
            c.1, c.0
        ));
    }
}

/// One running step's view.
pub struct Step<'a> {
    progress: &'a Progress,
    label: StepLabel,
    start: Instant,
    bar: Option<ProgressBar>,
    partial: Vec<u8>,
}

impl Step<'_> {
    /// The step was satisfied from the cache.
    pub fn cached(self) {
        if let Ok(mut c) = self.progress.counts.lock() {
            c.cached += 1;
        }
        let text = format!("{} CACHED", self.label);
        self.close(&text);
    }

    /// The step needed no work of its own (a FROM of something already at hand).
    pub fn ready(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Why the step is being (re)built.
    pub fn rebuild_reason(&self, reason: &str) {
        if self.progress.mode == Mode::Plain {
            self.progress.line(&format!(
                "{} (line {}): rebuilding: {reason}",
                self.label, self.label.line
            ));
        } else if let Some(bar) = &self.bar {
            bar.set_message(format!("rebuilding: {reason}"));
        }
    }

    /// Output of the step's process; shown line by line.
    pub fn output(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            self.emit_output(&String::from_utf8_lossy(&line[..line.len() - 1]));
        }
    }

    fn emit_output(&self, line: &str) {
        match (&self.bar, self.progress.mode) {
            (Some(bar), _) => bar.set_message(one_line(line, 80)),
            (None, Mode::Plain) => self.progress.line(&format!("  {line}")),
            _ => {}
        }
    }

    /// The step finished and was run (not cached).
    pub fn done(mut self) {
        self.flush_partial();
        if let Ok(mut c) = self.progress.counts.lock() {
            c.built += 1;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let text = format!("{} DONE {secs:.2}s", self.label);
        self.close(&text);
    }

    /// The step failed; its output so far is shown in full in the tty view too.
    pub fn failed(mut self) {
        self.flush_partial();
        let secs = self.start.elapsed().as_secs_f64();
        let text = format!("{} ERROR after {secs:.2}s", self.label);
        self.close(&text);
    }

    fn flush_partial(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.emit_output(&String::from_utf8_lossy(&rest));
        }
    }

    fn close(self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.progress.mode != Mode::Quiet {
            self.progress.line(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_one_line_and_bounded() {
        let l = StepLabel {
            stage: "build".into(),
            number: 2,
            total: 5,
            text: "RUN a\nb".into(),
            line: 3,
        };
        assert_eq!(l.to_string(), "[build 2/5] RUN a b");
        let long = StepLabel {
            text: "x".repeat(300),
            ..l
        };
        assert!(long.to_string().len() < 130);
    }
}
