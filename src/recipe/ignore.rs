//! `.dockerignore` rules with Docker's semantics (moby `patternmatcher`), not gitignore's.
//!
//! Patterns are Go `filepath.Match` globs (`*` `?` `[...]`, `\` escapes; `*` and `?` never
//! match `/`) plus `**` for any number of directories. They are anchored at the context root
//! (no implicit `**/` prefix). A pattern that matches a directory excludes everything under
//! it; `!pattern` re-includes; the last matching line wins.

use std::path::{Path, PathBuf};

/// A `.dockerignore` file that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreError {
    /// A line that is only `!` (after trimming and cleaning).
    #[error("line {line}: illegal exclusion pattern \"!\"")]
    LoneExclamation {
        /// 1-based line number.
        line: usize,
    },
    /// A pattern that Go's `filepath.Match` rejects (bad `[...]`, trailing `\`).
    #[error("line {line}: syntax error in pattern `{pattern}`: {reason}")]
    BadPattern {
        /// 1-based line number.
        line: usize,
        /// The pattern after cleaning.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parsed `.dockerignore` rules, in file order.
#[derive(Clone, Debug, Default)]
pub struct IgnoreRules {
    patterns: Vec<Pattern>,
}

/// One rule.
#[derive(Clone, Debug)]
struct Pattern {
    /// `!pattern`: a match re-includes.
    exclusion: bool,
    kind: Kind,
}

/// How a pattern matches; mirrors patternmatcher's match types, whose shortcuts differ
/// slightly from the glob reading (e.g. `**.md` is "ends with `.md`").
#[derive(Clone, Debug)]
enum Kind {
    /// No wildcards: the path equals the pattern.
    Exact(String),
    /// Literal text followed by a final `**`: the path starts with the text.
    Prefix(String),
    /// A leading `**` followed by literal text: the path ends with the text (or equals it
    /// without its leading `/`).
    Suffix(String),
    /// Anything else: a glob automaton.
    Glob(Vec<Tok>),
}

/// One element of a glob.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    /// This exact character.
    Lit(char),
    /// `?`: one character except `/`.
    One,
    /// `*`: any characters except `/`.
    Star,
    /// `**` (with its `/`) inside a pattern: nothing, or anything ending in `/`.
    Dirs,
    /// `**` at the end: anything.
    Rest,
    /// `[...]`: one character in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `^` (a regexp anchor in Docker's translation): matches only at the start.
    Caret,
}

impl IgnoreRules {
    /// Parse .dockerignore text: one pattern per line, '#' lines are comments, lines trimmed,
    /// leading '/' dropped, patterns cleaned (filepath.Clean), `!` prefix = exception; `!`
    /// alone is an error.
    pub fn parse(text: &str) -> Result<IgnoreRules, IgnoreError> {
        let mut patterns = Vec::new();
        for (index, line) in text.split('\n').enumerate() {
            let line_no = index + 1;
            let mut line = line.strip_suffix('\r').unwrap_or(line);
            if index == 0 {
                line = line.strip_prefix('\u{feff}').unwrap_or(line);
            }
            // Comments are recognised before trimming, as Docker does.
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            // Docker's ignore-file reader: strip `!`, clean, drop a leading `/`, re-add `!`.
            let (invert, body) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let mut cleaned = if body.is_empty() {
                String::new()
            } else {
                clean(body)
            };
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let full = if invert {
                format!("!{cleaned}")
            } else {
                cleaned
            };
            // The pattern matcher then cleans the whole string again.
            let full = clean(full.trim());
            let (exclusion, pattern) = match full.strip_prefix('!') {
                Some("") => return Err(IgnoreError::LoneExclamation { line: line_no }),
                Some(rest) => (true, rest),
                None => (false, full.as_str()),
            };
            validate(pattern).map_err(|reason| IgnoreError::BadPattern {
                line: line_no,
                pattern: pattern.to_owned(),
                reason,
            })?;
            patterns.push(Pattern {
                exclusion,
                kind: compile(pattern),
            });
        }
        Ok(IgnoreRules { patterns })
    }

    /// Rules that exclude nothing.
    pub fn empty() -> IgnoreRules {
        IgnoreRules::default()
    }

    /// Whether there are no rules (nothing is excluded).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Is this context-relative path (forward slashes, no leading '/') excluded?
    /// Last matching pattern wins; a pattern matching a parent directory excludes the subtree.
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let path = normalize(rel_path);
        let mut excluded = false;
        for p in &self.patterns {
            // Only a rule that could change the outcome needs evaluating.
            if p.exclusion != excluded {
                continue;
            }
            if p.matches_self_or_parent(path) {
                excluded = !p.exclusion;
            }
        }
        excluded
    }

    /// Could anything under this excluded directory be re-included by a later `!` rule?
    /// (The context walker uses this to decide whether to descend into an excluded dir.)
    ///
    /// Conservative: `true` means "maybe", `false` means nothing under `rel_dir` can be
    /// included. Only `!` rules after the last excluding rule that covers `rel_dir` count.
    pub fn may_reinclude_under(&self, rel_dir: &str) -> bool {
        let dir = normalize(rel_dir);
        let after = self
            .patterns
            .iter()
            .rposition(|p| !p.exclusion && p.matches_self_or_parent(dir))
            .map_or(0, |i| i + 1);
        self.patterns[after..]
            .iter()
            .any(|p| p.exclusion && p.could_match_under(dir))
    }
}

/// Which ignore file applies: `<dockerfile-name>.containerignore` or `.dockerignore` next to
/// the Dockerfile takes precedence over `CONTEXT/.containerignore` (buildah's name, preferred
/// as buildah does) and then `CONTEXT/.dockerignore`.
pub fn ignore_file_for(context_dir: &Path, dockerfile: Option<&Path>) -> Option<PathBuf> {
    const NAMES: [&str; 2] = [".containerignore", ".dockerignore"];
    if let Some(dockerfile) = dockerfile
        && let Some(name) = dockerfile.file_name()
    {
        for suffix in NAMES {
            let mut specific = name.to_os_string();
            specific.push(suffix);
            let specific = dockerfile.with_file_name(specific);
            if specific.is_file() {
                return Some(specific);
            }
        }
    }
    NAMES
        .iter()
        .map(|n| context_dir.join(n))
        .find(|p| p.is_file())
}

/// Drop a leading `/` and trailing `/`s from a path handed in by the walker.
fn normalize(path: &str) -> &str {
    path.trim_start_matches('/').trim_end_matches('/')
}

/// Go's `filepath.Clean` for `/`-separated paths.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            _ => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// The syntax check of Go's `filepath.Match` (Unix): `\` needs a following character and
/// `[...]` must hold at least one well-formed range and be closed.
fn validate(pattern: &str) -> Result<(), String> {
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // The guard consumes the escaped character.
            '\\' if chars.next().is_none() => return Err("trailing '\\'".to_owned()),
            '[' => {
                parse_class(&mut chars)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parse a `[...]` body after the `[`, consuming the closing `]`.
fn parse_class(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
) -> Result<(bool, Vec<(char, char)>), String> {
    let negated = chars.next_if_eq(&'^').is_some();
    let mut ranges = Vec::new();
    loop {
        if !ranges.is_empty() && chars.next_if_eq(&']').is_some() {
            return Ok((negated, ranges));
        }
        let lo = class_char(chars)?;
        let hi = if chars.next_if_eq(&'-').is_some() {
            class_char(chars)?
        } else {
            lo
        };
        ranges.push((lo, hi));
    }
}

/// One (possibly `\`-escaped) character inside `[...]`; it must not be the last thing.
fn class_char(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<char, String> {
    let c = match chars.next() {
        None => return Err("unterminated '['".to_owned()),
        Some(c @ ('-' | ']')) => return Err(format!("unexpected '{c}' in '[...]'")),
        Some('\\') => chars.next().ok_or("unterminated '['")?,
        Some(c) => c,
    };
    if chars.peek().is_none() {
        return Err("unterminated '['".to_owned());
    }
    Ok(c)
}

/// Translate a validated pattern the way patternmatcher does, choosing the same match type.
fn compile(pattern: &str) -> Kind {
    #[derive(PartialEq)]
    enum Detected {
        Exact,
        Prefix,
        Suffix,
        Glob,
    }
    let mut detected = Detected::Exact;
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    let mut first = true;
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.next_if_eq(&'*').is_some() => {
                chars.next_if_eq(&'/');
                if chars.peek().is_none() {
                    if detected == Detected::Exact {
                        detected = Detected::Prefix;
                    } else {
                        tokens.push(Tok::Rest);
                        detected = Detected::Glob;
                    }
                } else {
                    tokens.push(Tok::Dirs);
                    detected = Detected::Glob;
                }
                if first {
                    detected = Detected::Suffix;
                }
            }
            '*' => {
                tokens.push(Tok::Star);
                detected = Detected::Glob;
            }
            '?' => {
                tokens.push(Tok::One);
                detected = Detected::Glob;
            }
            '\\' => match chars.next() {
                Some(n) => {
                    tokens.push(Tok::Lit(n));
                    detected = Detected::Glob;
                }
                None => tokens.push(Tok::Lit('\\')),
            },
            '[' => {
                // `validate` already accepted the class, so this cannot fail.
                let (negated, ranges) = parse_class(&mut chars).unwrap_or((false, Vec::new()));
                tokens.push(Tok::Class { negated, ranges });
                detected = Detected::Glob;
            }
            ']' => {
                tokens.push(Tok::Lit(']'));
                detected = Detected::Glob;
            }
            '^' => tokens.push(Tok::Caret),
            c => tokens.push(Tok::Lit(c)),
        }
        first = false;
    }
    match detected {
        Detected::Exact => Kind::Exact(pattern.to_owned()),
        // A cleaned pattern never ends in `/`, so the prefix form ends in `**`; the suffix
        // form always starts with it.
        Detected::Prefix => Kind::Prefix(pattern.strip_suffix("**").unwrap_or(pattern).to_owned()),
        Detected::Suffix => Kind::Suffix(pattern.strip_prefix("**").unwrap_or(pattern).to_owned()),
        Detected::Glob => Kind::Glob(tokens),
    }
}

impl Pattern {
    /// Does the pattern match exactly this path?
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact(p) => path == p,
            Kind::Prefix(p) => path.starts_with(p.as_str()),
            Kind::Suffix(s) => {
                path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Kind::Glob(tokens) => run(tokens, path).last().copied().unwrap_or(false),
        }
    }

    /// Does the pattern match the path or one of its parent directories?
    fn matches_self_or_parent(&self, path: &str) -> bool {
        self.matches(path)
            || path
                .match_indices('/')
                .any(|(i, _)| self.matches(&path[..i]))
    }

    /// Could the pattern match `dir`, one of its parents, or some path under `dir/`?
    fn could_match_under(&self, dir: &str) -> bool {
        if self.matches_self_or_parent(dir) {
            return true;
        }
        let under = format!("{dir}/");
        match &self.kind {
            Kind::Exact(p) => p.starts_with(&under),
            Kind::Prefix(p) => p.starts_with(&under) || under.starts_with(p.as_str()),
            Kind::Suffix(_) => true,
            Kind::Glob(tokens) => run(tokens, &under).contains(&true),
        }
    }
}

/// Simulate the glob automaton over `text` and return the final set of active states:
/// state `2*i` is "before token i" (the last, `2*len`, accepts) and `2*i + 1` is "inside
/// the `**` at token i, after a character that was not its closing `/`".
fn run(tokens: &[Tok], text: &str) -> Vec<bool> {
    let size = 2 * tokens.len() + 1;
    let mut cur = vec![false; size];
    let mut next = vec![false; size];
    close(tokens, &mut cur, 0, true);
    for c in text.chars() {
        next.iter_mut().for_each(|s| *s = false);
        for i in 0..tokens.len() {
            let (at, inside) = (cur[2 * i], cur[2 * i + 1]);
            if !at && !inside {
                continue;
            }
            let to_next = match &tokens[i] {
                Tok::Dirs => {
                    if c != '\n' {
                        next[2 * i + 1] = true;
                    }
                    c == '/'
                }
                _ if !at => false,
                Tok::Lit(l) => *l == c,
                Tok::One => c != '/',
                Tok::Star => {
                    next[2 * i] |= c != '/';
                    false
                }
                Tok::Rest => {
                    next[2 * i] |= c != '\n';
                    false
                }
                Tok::Class { negated, ranges } => {
                    ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
                }
                Tok::Caret => false,
            };
            if to_next {
                next[2 * (i + 1)] = true;
            }
        }
        std::mem::swap(&mut cur, &mut next);
        for i in 0..=tokens.len() {
            if cur[2 * i] {
                close(tokens, &mut cur, i, false);
            }
        }
        if !cur.contains(&true) {
            break;
        }
    }
    cur
}

/// Mark token position `i` active plus everything reachable without consuming input.
fn close(tokens: &[Tok], states: &mut [bool], mut i: usize, at_start: bool) {
    loop {
        states[2 * i] = true;
        match tokens.get(i) {
            Some(Tok::Star | Tok::Dirs | Tok::Rest) => i += 1,
            Some(Tok::Caret) if at_start => i += 1,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> IgnoreRules {
        IgnoreRules::parse(text).unwrap()
    }

    #[test]
    fn table() {
        // (rules, path, excluded)
        let cases: &[(&str, &str, bool)] = &[
            ("*.md", "README.md", true),
            ("*.md", "docs/README.md", false),
            ("*.md\n!README.md", "README.md", false),
            ("*.md\n!README.md", "CHANGES.md", true),
            ("!README.md\n*.md", "README.md", true),
            ("**/*.md", "docs/a/b.md", true),
            ("**/*.md", "b.md", true),
            ("**/*.md", "b.txt", false),
            ("docs/**/*.md", "docs/x.md", true),
            ("docs/**/*.md", "docs/a/b/x.md", true),
            ("docs/**/*.md", "other/x.md", false),
            ("docs/**", "docs/a/b", true),
            ("docs/**", "docs", false),
            ("/secret", "secret", true),
            ("/secret", "a/secret", false),
            ("secret", "a/secret", false),
            ("./secret/", "secret/key", true),
            ("a/../b", "b", true),
            ("node_modules", "node_modules/x/y.js", true),
            (
                "node_modules\n!node_modules/keep",
                "node_modules/keep/y.js",
                false,
            ),
            (
                "node_modules\n!node_modules/keep",
                "node_modules/drop/y.js",
                true,
            ),
            ("*\n!src", "src/main.rs", false),
            ("*\n!src", "Cargo.toml", true),
            ("*/temp*", "x/temporary", true),
            ("*/temp*", "x/y/temp", false),
            ("temp?", "temp1", true),
            ("temp?", "temp/", false),
            ("file[0-9]", "file7", true),
            ("file[0-9]", "filex", false),
            ("file[^0-9]", "filex", true),
            ("file\\*", "file*", true),
            ("file\\*", "filex", false),
            ("a.b", "axb", false),
            ("a+b(c)", "a+b(c)", true),
            ("# comment\n\n   \nbuild", "build/out", true),
            ("# build", "# build", false),
            (" # build", "# build", true),
            ("  spaced  ", "spaced", true),
            ("**", "anything/at/all", true),
            ("**.md", "a/b.md", true),
            ("**/foo", "foo", true),
            ("**/foo", "a/foo", true),
            ("**/foo", "afoo", false),
            ("*", ".dockerignore", true),
            ("!x", "x", false),
        ];
        for (text, path, excluded) in cases {
            assert_eq!(
                rules(text).is_excluded(path),
                *excluded,
                "rules {text:?}, path {path:?}"
            );
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            IgnoreRules::parse("a\n!\n").unwrap_err(),
            IgnoreError::LoneExclamation { line: 2 }
        );
        assert_eq!(
            IgnoreRules::parse("!  ").unwrap_err(),
            IgnoreError::LoneExclamation { line: 1 }
        );
        assert!(matches!(
            IgnoreRules::parse("a[").unwrap_err(),
            IgnoreError::BadPattern { line: 1, .. }
        ));
        for bad in ["[]", "a\\", "[a-]", "[z", "[^]"] {
            assert!(IgnoreRules::parse(bad).is_err(), "{bad}");
        }
        assert!(
            IgnoreRules::parse("\u{feff}# bom comment\r\nx\r\n")
                .unwrap()
                .is_excluded("x")
        );
        assert!(!IgnoreRules::empty().is_excluded("anything"));
    }

    #[test]
    fn reinclusion_under_excluded_dirs() {
        let r = rules("node_modules\n!node_modules/keep\nbuild\n");
        assert!(r.may_reinclude_under("node_modules"));
        assert!(!r.may_reinclude_under("node_modules/drop"));
        assert!(!r.may_reinclude_under("build"));

        let r = rules("*\n!**/README.md");
        assert!(r.may_reinclude_under("docs"));
        assert!(!r.is_excluded("docs/README.md"));
        assert!(r.is_excluded("docs/other.md"));

        let r = rules("docs\n!docs/*.md\n");
        assert!(r.may_reinclude_under("docs"));
        assert!(!r.may_reinclude_under("docs/sub"));

        // A `!` rule before the excluding rule cannot re-include.
        let r = rules("!docs/keep\ndocs");
        assert!(!r.may_reinclude_under("docs"));
        assert!(r.is_excluded("docs/keep"));

        let r = rules("a\n!a/b/c**");
        assert!(r.may_reinclude_under("a"));
        assert!(r.may_reinclude_under("a/b"));
        assert!(!r.may_reinclude_under("a/x"));
    }

    #[test]
    fn clean_matches_go() {
        for (input, expected) in [
            ("a/b/../c", "a/c"),
            ("/../x", "/x"),
            ("../../x", "../../x"),
            ("./", "."),
            ("a//b/", "a/b"),
            ("/", "/"),
        ] {
            assert_eq!(clean(input), expected);
        }
    }

    #[test]
    fn ignore_file_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path();
        assert_eq!(ignore_file_for(ctx, None), None);
        std::fs::write(ctx.join(".dockerignore"), "x").unwrap();
        assert_eq!(ignore_file_for(ctx, None), Some(ctx.join(".dockerignore")));
        let df = ctx.join("sub").join("Dockerfile.dev");
        std::fs::create_dir(ctx.join("sub")).unwrap();
        std::fs::write(&df, "FROM scratch").unwrap();
        assert_eq!(
            ignore_file_for(ctx, Some(&df)),
            Some(ctx.join(".dockerignore"))
        );
        std::fs::write(ctx.join("sub/Dockerfile.dev.dockerignore"), "y").unwrap();
        assert_eq!(
            ignore_file_for(ctx, Some(&df)),
            Some(ctx.join("sub/Dockerfile.dev.dockerignore"))
        );
        std::fs::remove_file(ctx.join(".dockerignore")).unwrap();
        assert_eq!(
            ignore_file_for(ctx, Some(&df)),
            Some(ctx.join("sub/Dockerfile.dev.dockerignore"))
        );
        // buildah's name wins over Docker's, at both levels.
        std::fs::write(ctx.join("sub/Dockerfile.dev.containerignore"), "z").unwrap();
        assert_eq!(
            ignore_file_for(ctx, Some(&df)),
            Some(ctx.join("sub/Dockerfile.dev.containerignore"))
        );
        std::fs::write(ctx.join(".dockerignore"), "x").unwrap();
        std::fs::write(ctx.join(".containerignore"), "c").unwrap();
        assert_eq!(
            ignore_file_for(ctx, None),
            Some(ctx.join(".containerignore"))
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics(
                text in "[a-c*?\\[\\]^!/.# \n-]{0,30}",
                path in "[a-c/.\n]{0,12}",
            ) {
                if let Ok(r) = IgnoreRules::parse(&text) {
                    let _ = r.is_excluded(&path);
                    let _ = r.may_reinclude_under(&path);
                }
            }

            #[test]
            fn reinclusion_check_is_conservative(
                text in "(!?[ab*]{1,3}(/[ab*]{1,2}){0,2}\n){1,4}",
                dir in "[ab]{1,2}",
                child in "[ab]{1,2}(/[ab]{1,2}){0,1}",
            ) {
                let r = IgnoreRules::parse(&text).unwrap();
                let path = format!("{dir}/{child}");
                if r.is_excluded(&dir) && !r.is_excluded(&path) {
                    prop_assert!(r.may_reinclude_under(&dir), "{text:?} {path:?}");
                }
            }
        }
    }
}
