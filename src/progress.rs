//! Build progress: turns step events into plain timestamped lines (CI, logs), a live indicatif
//! view (a terminal), one JSON event a line (`rawjson`, BuildKit's solve-status shape), or
//! nothing (`--quiet`). The only writer to the terminal during a build.

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
    /// One JSON object a line on stderr, shaped like BuildKit's `--progress rawjson` status
    /// (`vertexes`, `statuses`, `logs`, `warnings`).
    RawJson,
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
        if self.mode == Mode::RawJson {
            let now = rawjson::now();
            let vertex = rawjson::Vertex {
                digest: rawjson::digest_of(text),
                name: text,
                started: Some(now.clone()),
                completed: Some(now),
                cached: false,
                error: None,
            };
            rawjson::emit(&rawjson::Status::vertex(vertex));
            return;
        }
        self.line(text);
    }

    /// A warning, shown in every mode but quiet.
    pub fn warn(&self, text: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::RawJson => rawjson::emit(&rawjson::Status::warning(text)),
            _ => self.line(&format!("WARNING: {text}")),
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
        let started = rawjson::now();
        let step = Step {
            progress: self,
            label,
            start: Instant::now(),
            bar,
            partial: Vec::new(),
            started,
        };
        step.json_vertex(None, false, None);
        step
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
    /// When it started (RFC 3339), for `rawjson`.
    started: String,
}

impl Step<'_> {
    /// The step's `rawjson` vertex, with its state.
    fn json_vertex(&self, completed: Option<String>, cached: bool, error: Option<&str>) {
        if self.progress.mode != Mode::RawJson {
            return;
        }
        let name = self.label.to_string();
        let vertex = rawjson::Vertex {
            digest: self.json_digest(),
            name: &name,
            started: Some(self.started.clone()),
            completed,
            cached,
            error,
        };
        rawjson::emit(&rawjson::Status::vertex(vertex));
    }

    fn json_digest(&self) -> String {
        rawjson::digest_of(&format!(
            "{}\n{}\n{}",
            self.label.stage, self.label.number, self.label.text
        ))
    }

    /// The step was satisfied from the cache.
    pub fn cached(self) {
        if let Ok(mut c) = self.progress.counts.lock() {
            c.cached += 1;
        }
        let text = format!("{} CACHED", self.label);
        self.json_vertex(Some(rawjson::now()), true, None);
        self.close(&text);
    }

    /// The step needed no work of its own (a FROM of something already at hand).
    pub fn ready(self) {
        self.json_vertex(Some(rawjson::now()), false, None);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Why the step is being (re)built.
    pub fn rebuild_reason(&self, reason: &str) {
        if self.progress.mode == Mode::RawJson {
            let status = rawjson::StatusLine {
                id: format!("rebuilding: {reason}"),
                vertex: self.json_digest(),
                name: "rebuilding",
                timestamp: rawjson::now(),
            };
            rawjson::emit(&rawjson::Status::note(status));
        } else if self.progress.mode == Mode::Plain {
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
        if self.progress.mode == Mode::RawJson {
            let log = rawjson::Log {
                vertex: self.json_digest(),
                stream: 1,
                data: rawjson::base64(format!("{line}\n").as_bytes()),
                timestamp: rawjson::now(),
            };
            rawjson::emit(&rawjson::Status::log(log));
            return;
        }
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
        self.json_vertex(Some(rawjson::now()), false, None);
        self.close(&text);
    }

    /// The step failed; its output so far is shown in full in the tty view too.
    pub fn failed(mut self) {
        self.flush_partial();
        let secs = self.start.elapsed().as_secs_f64();
        let text = format!("{} ERROR after {secs:.2}s", self.label);
        self.json_vertex(Some(rawjson::now()), false, Some("the step failed"));
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
        if !matches!(self.progress.mode, Mode::Quiet | Mode::RawJson) {
            self.progress.line(text);
        }
    }
}

/// `--progress rawjson`: BuildKit's solve-status shape, one object a line.
mod rawjson {
    use std::io::Write;

    use base64::Engine as _;
    use serde::Serialize;

    /// One line: any of the four lists, the empty ones left out.
    #[derive(Serialize, Default)]
    pub(super) struct Status<'a> {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        vertexes: Vec<Vertex<'a>>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        statuses: Vec<StatusLine<'a>>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        logs: Vec<Log>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<Warning>,
    }

    impl<'a> Status<'a> {
        pub(super) fn vertex(v: Vertex<'a>) -> Self {
            Status {
                vertexes: vec![v],
                ..Default::default()
            }
        }
        pub(super) fn note(s: StatusLine<'a>) -> Self {
            Status {
                statuses: vec![s],
                ..Default::default()
            }
        }
        pub(super) fn log(l: Log) -> Self {
            Status {
                logs: vec![l],
                ..Default::default()
            }
        }
        pub(super) fn warning(text: &'a str) -> Self {
            Status {
                warnings: vec![Warning {
                    level: 1,
                    short: base64(text.as_bytes()),
                }],
                ..Default::default()
            }
        }
    }

    /// A step (BuildKit: a vertex of the build graph).
    #[derive(Serialize)]
    pub(super) struct Vertex<'a> {
        pub(super) digest: String,
        pub(super) name: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(super) started: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(super) completed: Option<String>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub(super) cached: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(super) error: Option<&'a str>,
    }

    /// A note on a running step.
    #[derive(Serialize)]
    pub(super) struct StatusLine<'a> {
        pub(super) id: String,
        pub(super) vertex: String,
        pub(super) name: &'a str,
        pub(super) timestamp: String,
    }

    /// Output of a step's process; `data` is base64, as BuildKit's bytes are.
    #[derive(Serialize)]
    pub(super) struct Log {
        pub(super) vertex: String,
        pub(super) stream: u8,
        pub(super) data: String,
        pub(super) timestamp: String,
    }

    /// A warning (a build check finding, an unused build arg); `short` is base64.
    #[derive(Serialize)]
    struct Warning {
        level: u8,
        short: String,
    }

    pub(super) fn base64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A stable id for a step or message.
    pub(super) fn digest_of(text: &str) -> String {
        crate::digest::Digest::of(text.as_bytes()).to_string()
    }

    /// Now, RFC 3339 with nanoseconds.
    pub(super) fn now() -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = crate::image::rfc3339(t.as_secs() as i64);
        format!("{}.{:09}Z", secs.trim_end_matches('Z'), t.subsec_nanos())
    }

    /// Writes one line to stderr.
    pub(super) fn emit(status: &Status<'_>) {
        if let Ok(mut line) = serde_json::to_vec(status) {
            line.push(b'\n');
            let _ = std::io::stderr().lock().write_all(&line);
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
