//! BuildKit-compatible shell-word processing: quote removal, escapes, `$VAR` expansion
//! (including the `${v:-w}` family and the `#` `%` `/` pattern forms) and word splitting.
//!
//! The behaviour follows BuildKit's `frontend/dockerfile/shell` lexer (the conformance
//! vectors are `envVarTest` and `wordsTest`). Nothing here executes anything: the only
//! input is the word and a variable lookup.
//!
//! Robustness: nesting of `${…}` is capped at [`MAX_DEPTH`] levels (an error, not a crash),
//! pattern matching is a linear-state automaton (never exponential), and every position is
//! kept on a UTF-8 character boundary, so no input can make this module panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

/// How many `${…}` substitutions may be nested inside each other before the lexer gives up.
pub const MAX_DEPTH: usize = 128;

/// Looks up variables during expansion.
pub trait Vars {
    /// The value of `name`, or `None` when it is not set (set-but-empty is `Some("")`).
    fn get(&self, name: &str) -> Option<&str>;
}

impl Vars for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        BTreeMap::get(self, name).map(String::as_str)
    }
}

impl<S: BuildHasher> Vars for HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<&str> {
        HashMap::get(self, name).map(String::as_str)
    }
}

/// The result of an expansion together with the variables it looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expanded<T> {
    /// The expanded word (or words).
    pub value: T,
    /// Every variable name referenced, set or not (the cache uses this).
    pub used: BTreeSet<String>,
}

/// Why a word could not be processed. Every variant carries `at`, the byte offset in the
/// input word of the construct that failed (see [`ShellError::offset`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// A `'` without its closing `'`.
    #[error("unterminated single quote (opened at byte {at})")]
    UnterminatedSingleQuote {
        /// Offset of the opening quote.
        at: usize,
    },
    /// A `"` without its closing `"`.
    #[error("unterminated double quote (opened at byte {at})")]
    UnterminatedDoubleQuote {
        /// Offset of the opening quote.
        at: usize,
    },
    /// A `${` without its closing `}`.
    #[error("missing '}}' for the substitution starting at byte {at}")]
    MissingBrace {
        /// Offset of the `$`.
        at: usize,
    },
    /// `${}`, `${{…}`, `${:…}` and similar.
    #[error("bad substitution at byte {at}: a variable name must follow '${{'")]
    BadSubstitution {
        /// Offset of the `$`.
        at: usize,
    },
    /// A modifier that is not supported, such as `${v:=w}`, `${v:#p}` or `${v.}`.
    #[error("unsupported modifier `{modifier}` in the substitution starting at byte {at}")]
    UnsupportedModifier {
        /// The modifier as written.
        modifier: String,
        /// Offset of the `$`.
        at: usize,
    },
    /// `${v/pattern` without the `/` that starts the replacement.
    #[error("missing '/' after the pattern in the substitution starting at byte {at}")]
    MissingSlash {
        /// Offset of the `$`.
        at: usize,
    },
    /// `${v?msg}` / `${v:?msg}` on an unset (or empty) variable.
    #[error("{name}: {message} (substitution at byte {at})")]
    Required {
        /// The variable.
        name: String,
        /// The message from the word, or a default one.
        message: String,
        /// Offset of the `$`.
        at: usize,
    },
    /// A malformed pattern in `${v#p}`, `${v%p}` or `${v/p/r}`.
    #[error("invalid pattern `{pattern}` in the substitution starting at byte {at}: {reason}")]
    InvalidPattern {
        /// The pattern after expansion.
        pattern: String,
        /// What is wrong with it.
        reason: String,
        /// Offset of the `$`.
        at: usize,
    },
    /// More than [`MAX_DEPTH`] nested substitutions.
    #[error("substitutions nested more than {limit} deep (at byte {at})")]
    TooDeep {
        /// The limit that was exceeded.
        limit: usize,
        /// Offset of the `$` that went over the limit.
        at: usize,
    },
}

impl ShellError {
    /// The byte offset in the input word of the construct that failed.
    pub fn offset(&self) -> usize {
        match self {
            ShellError::UnterminatedSingleQuote { at }
            | ShellError::UnterminatedDoubleQuote { at }
            | ShellError::MissingBrace { at }
            | ShellError::BadSubstitution { at }
            | ShellError::UnsupportedModifier { at, .. }
            | ShellError::MissingSlash { at }
            | ShellError::Required { at, .. }
            | ShellError::InvalidPattern { at, .. }
            | ShellError::TooDeep { at, .. } => *at,
        }
    }
}

/// A shell-word lexer for one escape character (`\` by default, `` ` `` with
/// `# escape=\``).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lexer {
    escape: char,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer::new('\\')
    }
}

impl Lexer {
    /// A lexer using `escape` as the escape character (`'\\'` or `` '`' ``).
    pub fn new(escape: char) -> Self {
        Lexer { escape }
    }

    /// The escape character this lexer uses.
    pub fn escape(&self) -> char {
        self.escape
    }

    /// Expand + quote removal, ONE word out (BuildKit `ProcessWord`).
    pub fn process_word(
        &self,
        word: &str,
        vars: &dyn Vars,
    ) -> Result<Expanded<String>, ShellError> {
        let mut p = Processor::new(word, self.escape, vars);
        let value = p.process_until(Stop::End, false, None)?;
        Ok(Expanded {
            value,
            used: p.used,
        })
    }

    /// Expansion of a COPY/ADD heredoc body (BuildKit's `SkipProcessQuotes` lexer, whose
    /// escape character is always `\`): quotes are ordinary characters, `$` expands, the
    /// escape character still escapes (`\$` is `$`, `\\` is `\`).
    pub fn process_heredoc(body: &str, vars: &dyn Vars) -> Result<Expanded<String>, ShellError> {
        let mut p = Processor::new(body, '\\', vars);
        p.skip_quotes = true;
        let value = p.process_until(Stop::End, false, None)?;
        Ok(Expanded {
            value,
            used: p.used,
        })
    }

    /// Expand + quote removal + word splitting (BuildKit `ProcessWords`). Only whitespace
    /// that is unquoted and unescaped in the input, or that comes from an unquoted
    /// expansion, separates words; empty words are dropped.
    pub fn process_words(
        &self,
        word: &str,
        vars: &dyn Vars,
    ) -> Result<Expanded<Vec<String>>, ShellError> {
        let mut p = Processor::new(word, self.escape, vars);
        let mut words = Words::default();
        p.process_until(Stop::End, false, Some(&mut words))?;
        Ok(Expanded {
            value: words.finish(),
            used: p.used,
        })
    }
}

/// Word-splitting accumulator (BuildKit's `wordsStruct`).
#[derive(Default)]
struct Words {
    current: String,
    done: Vec<String>,
}

impl Words {
    /// A character subject to splitting.
    fn add_char(&mut self, c: char) {
        if c.is_whitespace() {
            if !self.current.is_empty() {
                self.done.push(std::mem::take(&mut self.current));
            }
        } else {
            self.current.push(c);
        }
    }

    /// Text subject to splitting (an unquoted expansion).
    fn add_str(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    /// Text kept as-is (quoted or escaped).
    fn add_raw(&mut self, s: &str) {
        self.current.push_str(s);
    }

    fn finish(mut self) -> Vec<String> {
        if !self.current.is_empty() {
            self.done.push(self.current);
        }
        self.done
    }
}

/// Where a (nested) word ends.
#[derive(Clone, Copy)]
enum Stop {
    /// At the end of the input (top level).
    End,
    /// At an unescaped, unquoted `}`; `at` is the offset of the enclosing `$`.
    Brace { at: usize },
    /// At an unescaped, unquoted `/`; `at` is the offset of the enclosing `$`.
    Slash { at: usize },
}

/// One run over one word.
struct Processor<'a> {
    src: &'a str,
    pos: usize,
    escape: char,
    vars: &'a dyn Vars,
    used: BTreeSet<String>,
    /// Keep escape characters in the output (pattern and replacement words).
    raw_escapes: bool,
    /// Quotes are ordinary characters (heredoc bodies).
    skip_quotes: bool,
    depth: usize,
}

impl<'a> Processor<'a> {
    fn new(src: &'a str, escape: char, vars: &'a dyn Vars) -> Self {
        Processor {
            src,
            pos: 0,
            escape,
            vars,
            used: BTreeSet::new(),
            raw_escapes: false,
            skip_quotes: false,
            depth: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.src.get(self.pos..).and_then(|s| s.chars().next())
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn lookup(&mut self, name: &str) -> Option<&'a str> {
        if !self.used.contains(name) {
            self.used.insert(name.to_owned());
        }
        self.vars.get(name)
    }

    /// Process until `stop` (consumed) or the end of input; `raw` keeps escape characters.
    fn process_until(
        &mut self,
        stop: Stop,
        raw: bool,
        words: Option<&mut Words>,
    ) -> Result<String, ShellError> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw);
        let result = self.process_until_inner(stop, words);
        self.raw_escapes = saved;
        result
    }

    fn process_until_inner(
        &mut self,
        stop: Stop,
        mut words: Option<&mut Words>,
    ) -> Result<String, ShellError> {
        let stop_char = match stop {
            Stop::End => None,
            Stop::Brace { .. } => Some('}'),
            Stop::Slash { .. } => Some('/'),
        };
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop_char {
                self.bump();
                return Ok(out);
            }
            match c {
                '$' => {
                    let value = self.dollar()?;
                    if let Some(w) = words.as_deref_mut() {
                        w.add_str(&value);
                    }
                    out.push_str(&value);
                }
                '\'' | '"' if !self.skip_quotes => {
                    let value = if c == '\'' {
                        self.single_quote()?
                    } else {
                        self.double_quote()?
                    };
                    if let Some(w) = words.as_deref_mut() {
                        w.add_raw(&value);
                    }
                    out.push_str(&value);
                }
                _ => {
                    self.bump();
                    if c == self.escape {
                        if self.raw_escapes {
                            out.push(c);
                            if let Some(w) = words.as_deref_mut() {
                                w.add_raw(c.encode_utf8(&mut [0; 4]));
                            }
                        }
                        // A trailing escape is dropped.
                        let Some(escaped) = self.bump() else { break };
                        out.push(escaped);
                        if let Some(w) = words.as_deref_mut() {
                            w.add_raw(escaped.encode_utf8(&mut [0; 4]));
                        }
                    } else {
                        out.push(c);
                        if let Some(w) = words.as_deref_mut() {
                            w.add_char(c);
                        }
                    }
                }
            }
        }
        match stop {
            Stop::End => Ok(out),
            Stop::Brace { at } => Err(ShellError::MissingBrace { at }),
            Stop::Slash { at } => Err(ShellError::MissingSlash { at }),
        }
    }

    /// `'…'`: everything literal up to the next `'`.
    fn single_quote(&mut self) -> Result<String, ShellError> {
        let at = self.pos;
        self.bump();
        let rest = self.src.get(self.pos..).unwrap_or("");
        match rest.find('\'') {
            Some(end) => {
                self.pos += end + 1;
                Ok(rest[..end].to_owned())
            }
            None => Err(ShellError::UnterminatedSingleQuote { at }),
        }
    }

    /// `"…"`: `$` expands; the escape character escapes only `"`, `$` and itself.
    fn double_quote(&mut self) -> Result<String, ShellError> {
        let at = self.pos;
        self.bump();
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(ShellError::UnterminatedDoubleQuote { at }),
                Some('"') => {
                    self.bump();
                    return Ok(out);
                }
                Some('$') => {
                    let value = self.dollar()?;
                    out.push_str(&value);
                }
                Some(c) => {
                    self.bump();
                    if c == self.escape {
                        if self.raw_escapes {
                            out.push(c);
                        }
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.bump();
                                out.push(n);
                            }
                            Some(_) => out.push(c),
                        }
                    } else {
                        out.push(c);
                    }
                }
            }
        }
    }

    /// A variable name: a run of digits, one special parameter, or letters/digits/`_`.
    fn name(&mut self) -> &'a str {
        let start = self.pos;
        match self.peek() {
            Some(c) if is_digit(c) => {
                while self.peek().is_some_and(is_digit) {
                    self.bump();
                }
            }
            Some('@' | '*' | '#' | '?' | '-' | '$' | '!') => {
                self.bump();
            }
            _ => {
                while self
                    .peek()
                    .is_some_and(|c| is_letter(c) || is_digit(c) || c == '_')
                {
                    self.bump();
                }
            }
        }
        self.src.get(start..self.pos).unwrap_or("")
    }

    /// `$name` or `${…}`, starting at the `$`.
    fn dollar(&mut self) -> Result<String, ShellError> {
        let at = self.pos;
        self.bump();
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_owned());
            }
            return Ok(self.lookup(name).unwrap_or("").to_owned());
        }
        self.bump();
        match self.peek() {
            None => return Err(ShellError::MissingBrace { at }),
            Some('{' | '}' | ':') => return Err(ShellError::BadSubstitution { at }),
            Some(_) => {}
        }
        if self.depth >= MAX_DEPTH {
            return Err(ShellError::TooDeep {
                limit: MAX_DEPTH,
                at,
            });
        }
        self.depth += 1;
        let result = self.braced(at);
        self.depth -= 1;
        result
    }

    /// The inside of `${…}` after the `{`.
    fn braced(&mut self, at: usize) -> Result<String, ShellError> {
        let name = self.name();
        match self.bump() {
            None => Err(ShellError::MissingBrace { at }),
            Some('}') => Ok(self.lookup(name).unwrap_or("").to_owned()),
            Some(':') => match self.bump() {
                None => Err(ShellError::MissingBrace { at }),
                Some(op @ ('-' | '+' | '?')) => self.modifier(name, op, true, at),
                Some(op) => Err(ShellError::UnsupportedModifier {
                    modifier: format!(":{op}"),
                    at,
                }),
            },
            Some(op @ ('-' | '+' | '?' | '#' | '%')) => self.modifier(name, op, false, at),
            Some('/') => self.replace(name, at),
            Some(op) => Err(ShellError::UnsupportedModifier {
                modifier: op.to_string(),
                at,
            }),
        }
    }

    /// `${name<op>word}` for `-` `+` `?` (with or without `:`) and `#` `%`.
    fn modifier(
        &mut self,
        name: &str,
        op: char,
        colon: bool,
        at: usize,
    ) -> Result<String, ShellError> {
        let pattern_form = op == '#' || op == '%';
        let word = self.process_until(Stop::Brace { at }, pattern_form, None)?;
        let value = self.lookup(name);
        let missing = match value {
            None => true,
            Some(v) => colon && v.is_empty(),
        };
        match op {
            '-' => Ok(if missing {
                word
            } else {
                value.unwrap_or("").to_owned()
            }),
            '+' => Ok(if missing { String::new() } else { word }),
            '?' => match value {
                Some(v) if !missing => Ok(v.to_owned()),
                _ => {
                    let message = if !word.is_empty() {
                        word
                    } else if value.is_none() {
                        "is not allowed to be unset".to_owned()
                    } else {
                        "is not allowed to be empty".to_owned()
                    };
                    Err(ShellError::Required {
                        name: name.to_owned(),
                        message,
                        at,
                    })
                }
            },
            _ => {
                let (longest, pattern) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest),
                    None => (false, word.as_str()),
                };
                let tokens =
                    parse_pattern(pattern).map_err(|reason| ShellError::InvalidPattern {
                        pattern: pattern.to_owned(),
                        reason,
                        at,
                    })?;
                let value = value.unwrap_or("");
                Ok(if op == '#' {
                    trim_prefix(&tokens, value, longest)
                } else {
                    trim_suffix(&tokens, value, longest)
                }
                .to_owned())
            }
        }
    }

    /// `${name/pattern/replacement}` and `${name//pattern/replacement}`.
    fn replace(&mut self, name: &str, at: usize) -> Result<String, ShellError> {
        let all = self.peek() == Some('/');
        if all {
            self.bump();
        }
        let pattern = self.process_until(Stop::Slash { at }, true, None)?;
        let replacement = self.process_until(Stop::Brace { at }, true, None)?;
        let value = self.lookup(name).unwrap_or("");
        let tokens = parse_pattern(&pattern).map_err(|reason| ShellError::InvalidPattern {
            pattern: pattern.clone(),
            reason,
            at,
        })?;
        Ok(replace(&tokens, value, &replacement, all))
    }
}

/// Go's `unicode.IsDigit`, approximated for non-ASCII by Rust's numeric property.
fn is_digit(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        c.is_numeric()
    }
}

/// Go's `unicode.IsLetter`, approximated for non-ASCII by Rust's alphabetic property.
fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        c.is_alphabetic()
    }
}

/// One element of a substitution pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    /// This exact character.
    Lit(char),
    /// `?`: any one character except a newline.
    Any,
    /// `*`: any run of characters without a newline.
    Star,
}

/// Parse a `#` `%` `/` pattern: `*`, `?`, and `\` escaping `*`, `?`, `\` (and `}` / `/`,
/// which need escaping inside `${…}`); every other character is literal, including `[`.
fn parse_pattern(pattern: &str) -> Result<Vec<Tok>, String> {
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {
                if tokens.last() != Some(&Tok::Star) {
                    tokens.push(Tok::Star);
                }
            }
            '?' => tokens.push(Tok::Any),
            '\\' => match chars.peek().copied() {
                Some('}' | '/') => {}
                Some(n @ ('*' | '?' | '\\')) => {
                    chars.next();
                    tokens.push(Tok::Lit(n));
                }
                Some(n) => return Err(format!("invalid escape '\\{n}'")),
                None => return Err("trailing '\\'".to_owned()),
            },
            c => tokens.push(Tok::Lit(c)),
        }
    }
    Ok(tokens)
}

/// A set of pattern positions, simulated over the text (a Thompson NFA without backtracking).
struct StateSet {
    states: Vec<usize>,
    member: Vec<bool>,
}

impl StateSet {
    fn new(len: usize) -> Self {
        StateSet {
            states: Vec::new(),
            member: vec![false; len + 1],
        }
    }

    /// Add `state` and everything reachable from it without consuming a character.
    fn add(&mut self, tokens: &[Tok], mut state: usize) {
        loop {
            if self.member[state] {
                return;
            }
            self.member[state] = true;
            self.states.push(state);
            if tokens.get(state) == Some(&Tok::Star) {
                state += 1;
            } else {
                return;
            }
        }
    }

    fn clear(&mut self) {
        for &s in &self.states {
            self.member[s] = false;
        }
        self.states.clear();
    }

    /// The set after consuming `c`, written into `next`.
    fn step(&self, tokens: &[Tok], c: char, next: &mut StateSet) {
        next.clear();
        for &s in &self.states {
            match tokens.get(s) {
                Some(Tok::Lit(l)) if *l == c => next.add(tokens, s + 1),
                Some(Tok::Any) if c != '\n' => next.add(tokens, s + 1),
                Some(Tok::Star) if c != '\n' => next.add(tokens, s),
                _ => {}
            }
        }
    }
}

/// The end offsets (ascending) of anchored matches of `tokens` over `chars`, reported as
/// the offsets given with each character: `first` is the offset before any character.
/// Returns the shortest (first) or the longest (last) one.
fn anchored_match(
    tokens: &[Tok],
    first: usize,
    chars: impl Iterator<Item = (usize, char)>,
    longest: bool,
) -> Option<usize> {
    let mut cur = StateSet::new(tokens.len());
    let mut next = StateSet::new(tokens.len());
    cur.add(tokens, 0);
    let mut best = None;
    if cur.member[tokens.len()] {
        best = Some(first);
        if !longest {
            return best;
        }
    }
    for (offset, c) in chars {
        cur.step(tokens, c, &mut next);
        std::mem::swap(&mut cur, &mut next);
        if cur.states.is_empty() {
            break;
        }
        if cur.member[tokens.len()] {
            best = Some(offset);
            if !longest {
                break;
            }
        }
    }
    best
}

/// `${v#p}` / `${v##p}`: remove the shortest / longest matching prefix.
fn trim_prefix<'v>(tokens: &[Tok], value: &'v str, longest: bool) -> &'v str {
    let ends = value.char_indices().map(|(i, c)| (i + c.len_utf8(), c));
    match anchored_match(tokens, 0, ends, longest) {
        Some(end) => value.get(end..).unwrap_or(value),
        None => value,
    }
}

/// `${v%p}` / `${v%%p}`: remove the shortest / longest matching suffix (matched from the
/// end, with the pattern reversed).
fn trim_suffix<'v>(tokens: &[Tok], value: &'v str, longest: bool) -> &'v str {
    let reversed: Vec<Tok> = tokens.iter().rev().copied().collect();
    match anchored_match(&reversed, value.len(), value.char_indices().rev(), longest) {
        Some(start) => value.get(..start).unwrap_or(value),
        None => value,
    }
}

/// The leftmost match of `tokens` in `value` starting at or after `from`, and of the
/// matches starting there the longest: `(start, end)` byte offsets.
fn find(tokens: &[Tok], value: &str, from: usize) -> Option<(usize, usize)> {
    let m = tokens.len();
    // For each active state, the leftmost start that reaches it.
    let mut cur: Vec<(usize, usize)> = Vec::new();
    let mut next: Vec<(usize, usize)> = Vec::new();
    let mut slot: Vec<Option<usize>> = vec![None; m + 1];
    let mut best: Option<(usize, usize)> = None;

    // Add (state, start) plus epsilon closure into `list`, keeping the smaller start.
    fn add(
        tokens: &[Tok],
        list: &mut Vec<(usize, usize)>,
        slot: &mut [Option<usize>],
        mut state: usize,
        start: usize,
    ) {
        loop {
            match slot[state] {
                Some(i) if list[i].1 <= start => return,
                Some(i) => list[i].1 = start,
                None => {
                    slot[state] = Some(list.len());
                    list.push((state, start));
                }
            }
            if tokens.get(state) == Some(&Tok::Star) {
                state += 1;
            } else {
                return;
            }
        }
    }

    let tail = value.get(from..).unwrap_or("");
    let mut iter = tail.char_indices().map(|(i, c)| (from + i, c)).peekable();
    let mut pos = from;
    // Invariant at the top of the loop: `slot` indexes exactly the states in `cur`.
    loop {
        if best.is_none() {
            add(tokens, &mut cur, &mut slot, 0, pos);
        }
        for &(state, start) in &cur {
            if state == m {
                let better = match best {
                    None => true,
                    Some((bs, be)) => start < bs || (start == bs && pos > be),
                };
                if better {
                    best = Some((start, pos));
                }
            }
        }
        for &(state, _) in &cur {
            slot[state] = None;
        }
        if let Some((bs, _)) = best {
            cur.retain(|&(_, start)| start <= bs);
            if cur.is_empty() {
                break;
            }
        }
        let Some((_, c)) = iter.next() else { break };
        next.clear();
        for &(state, start) in &cur {
            match tokens.get(state) {
                Some(Tok::Lit(l)) if *l == c => add(tokens, &mut next, &mut slot, state + 1, start),
                Some(Tok::Any) if c != '\n' => add(tokens, &mut next, &mut slot, state + 1, start),
                Some(Tok::Star) if c != '\n' => add(tokens, &mut next, &mut slot, state, start),
                _ => {}
            }
        }
        std::mem::swap(&mut cur, &mut next);
        pos = iter.peek().map_or(value.len(), |&(i, _)| i);
    }
    best
}

/// `${v/p/r}` (first match) and `${v//p/r}` (all matches), with Go's rules for empty
/// matches: an empty match right after a previous match is not replaced.
fn replace(tokens: &[Tok], value: &str, replacement: &str, all: bool) -> String {
    if !all {
        return match find(tokens, value, 0) {
            Some((a, b)) => format!("{}{}{}", &value[..a], replacement, &value[b..]),
            None => value.to_owned(),
        };
    }
    let mut out = String::new();
    let mut last_end = 0;
    let mut search = 0;
    while search <= value.len() {
        let Some((a, b)) = find(tokens, value, search) else {
            break;
        };
        out.push_str(value.get(last_end..a).unwrap_or(""));
        if b > last_end || a == 0 {
            out.push_str(replacement);
        }
        last_end = b;
        let width = value
            .get(search..)
            .and_then(|s| s.chars().next())
            .map_or(0, char::len_utf8);
        if search + width > b {
            search += width;
        } else if search + 1 > b {
            search += 1;
        } else {
            search = b;
        }
    }
    out.push_str(value.get(last_end..).unwrap_or(""));
    out
}

#[cfg(test)]
mod tests {

    /// BuildKit's testCopyHeredocSpecialSymbols and testHeredocVarSubstitution.
    #[test]
    fn heredoc_bodies_keep_quotes_and_process_escapes() {
        let vars: std::collections::BTreeMap<String, String> =
            [("name".to_string(), "world".to_string())].into();
        let h = |body: &str| Lexer::process_heredoc(body, &vars).unwrap().value;
        assert_eq!(h("\"quotes in file\"\n"), "\"quotes in file\"\n");
        assert_eq!(h("\\\n"), "\n");
        assert_eq!(h("\\\\\n"), "\\\n");
        assert_eq!(h("\\$\n"), "$\n");
        assert_eq!(
            h("Hello '${name}'! \"$name\"\n"),
            "Hello 'world'! \"world\"\n"
        );
        assert_eq!(h("${name:-x} ${nope:-def} ${name/o/0}"), "world def w0rld");
    }

    use super::*;
    use std::time::{Duration, Instant};

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn word(input: &str, pairs: &[(&str, &str)]) -> Result<String, ShellError> {
        Lexer::new('\\')
            .process_word(input, &env(pairs))
            .map(|e| e.value)
    }

    fn used(input: &str, pairs: &[(&str, &str)]) -> Vec<String> {
        let e = Lexer::new('\\').process_word(input, &env(pairs)).unwrap();
        e.used.into_iter().collect()
    }

    /// BuildKit's `TestProcessWithMatches` values and results (expected output, used set).
    #[test]
    fn match_and_replace_forms() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                r"${FOO#()[]{\}^$.\*\?|\\}",
                &[("FOO", r"()[]{}^$.*?|\x")],
                "x",
            ),
            (r"${FOO%%\**}", &[("FOO", "xx**")], "xx"),
            ("${FOO#*x*y}", &[("FOO", "xxyy")], "y"),
            ("${FOO#*}", &[("FOO", "xxyy")], "xxyy"),
            ("${FOO#$BAR}", &[("FOO", "xxyy"), ("BAR", "x")], "xyy"),
            ("${FOO#$BAR}", &[("FOO", "xxyy"), ("BAR", "")], "xxyy"),
            ("${FOO#}", &[("FOO", "xxyy")], "xxyy"),
            ("${FOO##*x}", &[("FOO", "xxyy")], "yy"),
            ("${FOO##}", &[("FOO", "xxyy")], "xxyy"),
            (r"${FOO#?\?}", &[("FOO", "???y")], "?y"),
            ("${ABC:-.}${FOO%x}${ABC:-.}", &[("FOO", "xxyy")], ".xxyy."),
            (r"${FOO%%\**\*}", &[("FOO", "a***yy*")], "a"),
            ("${FOO%}", &[("FOO", "xxyy")], "xxyy"),
            ("${FOO%%$BAR}", &[("FOO", "xxyy"), ("BAR", "")], "xxyy"),
            (
                "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
                &[("FOO", "/foo*/*/*.txt"), ("NEEDLE", r"\*/")],
                "/foo.*/*.txt - /foo..*.txt",
            ),
            (
                "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
                &[("FOO", "/tmp/tmp/bar.txt"), ("NEEDLE", "/tmp")],
                "/tmp/bar.txt - /bar.txt",
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
                &[
                    ("FOO", "/a/foo/b/c.txt"),
                    ("NEEDLE", "/?/"),
                    ("REPLACEMENT", "/"),
                ],
                "/foo/b/c.txt - /foo/c.txt",
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT}",
                &[
                    ("FOO", "http://google.de"),
                    ("NEEDLE", "http://"),
                    ("REPLACEMENT", "https://"),
                ],
                "https://google.de",
            ),
            (
                r"${FOO//\//\/}",
                &[("FOO", "/tmp/foo.txt")],
                r"\/tmp\/foo.txt",
            ),
            ("${FOO/$BAR/ww}", &[("FOO", "xxyy"), ("BAR", "")], "wwxxyy"),
            ("${FOO///}", &[("FOO", "xxyy")], "xxyy"),
            ("${FOO///}", &[], ""),
            // Shortest / longest prefix and suffix.
            ("${F#*/}", &[("F", "a/b/c")], "b/c"),
            ("${F##*/}", &[("F", "a/b/c")], "c"),
            ("${F%/*}", &[("F", "a/b/c")], "a/b"),
            ("${F%%/*}", &[("F", "a/b/c")], "a"),
            ("${F%.tar.*}", &[("F", "x.tar.gz")], "x"),
            ("${F#v}", &[("F", "v1.2.3")], "1.2.3"),
            ("${F%?}", &[("F", "한국어")], "한국"),
            ("${F#?}", &[("F", "한국어")], "국어"),
            // `[` is literal (BuildKit has no bracket expressions).
            ("${F#[ab]}", &[("F", "[ab]c")], "c"),
            ("${F#[ab]}", &[("F", "ac")], "ac"),
            // Replace first / all, leftmost-longest.
            ("${F/o/0}", &[("F", "foo boo")], "f0o boo"),
            ("${F//o/0}", &[("F", "foo boo")], "f00 b00"),
            ("${F/o*o/X}", &[("F", "foo boo")], "fX"),
            ("${F//?/.}", &[("F", "abc")], "..."),
            ("${F//x/y}", &[("F", "abc")], "abc"),
            // Go's empty-match rule.
            ("${F///-}", &[("F", "ab")], "-a-b-"),
            ("${F//*/-}", &[("F", "ab")], "-"),
            // `*` and `?` do not cross newlines (Go regexp `.`).
            ("${F#*x}", &[("F", "a\nx")], "a\nx"),
            // Quotes inside the pattern are removed; the content is still a pattern.
            ("${F#\"a\"}", &[("F", "ab")], "b"),
        ];
        for (input, vars, expected) in cases {
            assert_eq!(
                word(input, vars).as_deref(),
                Ok(*expected),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn pattern_errors() {
        for input in [
            r"${F#\x}",
            r"${F%\a}",
            r"${F/\q/r}",
            r"${F//ww}",
            "${F//}",
            "${F/a",
        ] {
            assert!(word(input, &[("F", "abc")]).is_err(), "input {input:?}");
        }
        let e = word(r"${F#a\x}", &[("F", "abc")]).unwrap_err();
        assert!(
            matches!(e, ShellError::InvalidPattern { at: 0, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains(r"invalid escape '\x'"), "{e}");
    }

    #[test]
    fn colon_pattern_forms_are_errors() {
        for input in [
            "${F:#a}",
            "${F:%a}",
            "${F:/a/b}",
            "${F:=a}",
            "${F=a}",
            "${F=:a}",
            "${F=}",
        ] {
            let e = word(input, &[("F", "abc")]).unwrap_err();
            assert!(
                matches!(e, ShellError::UnsupportedModifier { .. }),
                "{input}: {e:?}"
            );
        }
        let e = word("ab${F:=x}", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported modifier `:=` in the substitution starting at byte 2"
        );
    }

    /// BuildKit's `TestShellParserMandatoryEnvVars`, plus default messages.
    #[test]
    fn required_messages() {
        let set = [("VAR", "plain"), ("ARG", "x")];
        let empty = [("VAR", ""), ("ARG", "x")];
        let unset = [("ARG", "x")];
        let no_empty = "${VAR:?message here$ARG}";
        let no_unset = "${VAR?message here$ARG}";
        assert_eq!(word(no_empty, &set).unwrap(), "plain");
        for vars in [&empty[..], &unset[..]] {
            let e = word(no_empty, vars).unwrap_err();
            assert_eq!(e.to_string(), "VAR: message herex (substitution at byte 0)");
            assert_eq!(e.offset(), 0);
        }
        assert_eq!(word(no_unset, &set).unwrap(), "plain");
        assert_eq!(word(no_unset, &empty).unwrap(), "");
        assert!(
            word(no_unset, &unset)
                .unwrap_err()
                .to_string()
                .contains("message herex")
        );

        let e = word("a${V?}", &[]).unwrap_err();
        assert_eq!(
            e,
            ShellError::Required {
                name: "V".into(),
                message: "is not allowed to be unset".into(),
                at: 1
            }
        );
        let e = word("${V:?}", &[("V", "")]).unwrap_err();
        assert!(
            e.to_string().starts_with("V: is not allowed to be empty"),
            "{e}"
        );
    }

    #[test]
    fn error_offsets() {
        assert_eq!(
            word("ab'cd", &[]).unwrap_err(),
            ShellError::UnterminatedSingleQuote { at: 2 }
        );
        assert_eq!(
            word("a\"bc", &[]).unwrap_err(),
            ShellError::UnterminatedDoubleQuote { at: 1 }
        );
        assert_eq!(
            word("xy${PWD", &[]).unwrap_err(),
            ShellError::MissingBrace { at: 2 }
        );
        assert_eq!(
            word("x${}", &[]).unwrap_err(),
            ShellError::BadSubstitution { at: 1 }
        );
        assert_eq!(
            word("x${a:-${b", &[]).unwrap_err(),
            ShellError::MissingBrace { at: 6 }
        );
        assert_eq!(
            word("${a/b", &[]).unwrap_err(),
            ShellError::MissingSlash { at: 0 }
        );
    }

    /// BuildKit's matched + unmatched sets: every name looked up, set or not.
    #[test]
    fn used_variables() {
        assert!(used("x", &[("DUMMY", "d")]).is_empty());
        assert_eq!(used("x ${UNUSED}", &[]), ["UNUSED"]);
        assert_eq!(
            used("${FOO-a} ${BAR-b} ${BAZ-c}", &[("FOO", "x"), ("BAR", "")]),
            ["BAR", "BAZ", "FOO"]
        );
        // Names in an alternative that is not taken still count.
        assert_eq!(used("${A:-${B}}", &[("A", "a")]), ["A", "B"]);
        assert_eq!(used("${A:+$B}", &[]), ["A", "B"]);
        assert_eq!(used("'$A' \\$B \"$C\"", &[]), ["C"]);
        assert_eq!(used("$1 $@ ${FOO/$N/$R}", &[]), ["1", "@", "FOO", "N", "R"]);
        let words = Lexer::new('\\')
            .process_words("$A ${B:-x}", &env(&[]))
            .unwrap();
        assert_eq!(words.value, ["x"]);
        assert_eq!(words.used.into_iter().collect::<Vec<_>>(), ["A", "B"]);
    }

    #[test]
    fn backtick_escape() {
        let lexer = Lexer::new('`');
        let vars = env(&[("PWD", "/home")]);
        let w = |s: &str| lexer.process_word(s, &vars).map(|e| e.value);
        assert_eq!(w(r"C:\path\to").unwrap(), r"C:\path\to");
        assert_eq!(w("a`$PWD").unwrap(), "a$PWD");
        assert_eq!(w("a``$PWD").unwrap(), "a`/home");
        assert_eq!(w("a` b").unwrap(), "a b");
        assert_eq!(w("\"a`\"b\"").unwrap(), "a\"b");
        assert_eq!(w(r#""a\b""#).unwrap(), r"a\b");
        assert_eq!(w("\"a`tb\"").unwrap(), "a`tb");
        assert_eq!(w("trail`").unwrap(), "trail");
        assert_eq!(w("${X:-`}}").unwrap(), "}");
        let words = lexer.process_words(r"C:\a` b c", &vars).unwrap().value;
        assert_eq!(words, [r"C:\a b", "c"]);
    }

    #[test]
    fn word_splitting() {
        let vars = env(&[("S", " a  b "), ("E", "")]);
        let ws = |s: &str| Lexer::new('\\').process_words(s, &vars).map(|e| e.value);
        assert_eq!(ws("x${S}y").unwrap(), ["x", "a", "b", "y"]);
        assert_eq!(ws("\"\" $E ''").unwrap(), Vec::<String>::new());
        assert_eq!(ws("  a\tb\n c ").unwrap(), ["a", "b", "c"]);
        // BuildKit splits the result of `${v:-"a b"}` too.
        assert_eq!(ws("${U:-\"p q\"}").unwrap(), ["p", "q"]);
    }

    #[test]
    fn nested_ten_thousand_deep() {
        let depth = 10_000;
        let input = "${a:-".repeat(depth) + "x" + &"}".repeat(depth);
        let start = Instant::now();
        let result = Lexer::new('\\').process_word(&input, &env(&[]));
        assert!(start.elapsed() < Duration::from_secs(20));
        let e = result.unwrap_err();
        assert_eq!(
            e,
            ShellError::TooDeep {
                limit: MAX_DEPTH,
                at: MAX_DEPTH * 5
            }
        );
        assert!(e.to_string().contains("nested more than 128 deep"), "{e}");
        // Within the limit it works.
        let ok = "${a:-".repeat(MAX_DEPTH) + "x" + &"}".repeat(MAX_DEPTH);
        assert_eq!(word(&ok, &[]).unwrap(), "x");
        // Quotes do not reset the count.
        let quoted = "\"${a:-".repeat(depth) + &"}\"".repeat(depth);
        assert!(matches!(
            word(&quoted, &[]),
            Err(ShellError::TooDeep { .. })
        ));
    }

    #[test]
    fn one_mebibyte_word() {
        let big = "ab$X\\ \"q\"'s' ".repeat(1 << 20 >> 4);
        let vars = env(&[("X", "v w")]);
        let start = Instant::now();
        let one = Lexer::new('\\').process_word(&big, &vars).unwrap().value;
        let many = Lexer::new('\\').process_words(&big, &vars).unwrap().value;
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(one.len(), "abv w qs ".len() * (1 << 16));
        assert_eq!(many.len(), 2 << 16);
        // A long value through the pattern forms stays fast.
        let long = env(&[("V", &"ab".repeat(1 << 19))]);
        let start = Instant::now();
        let lexer = Lexer::new('\\');
        assert_eq!(lexer.process_word("${V##*a}", &long).unwrap().value, "b");
        assert_eq!(lexer.process_word("${V%%b*}", &long).unwrap().value, "a");
        assert_eq!(
            lexer.process_word("${V//b/}", &long).unwrap().value.len(),
            1 << 19
        );
        assert_eq!(lexer.process_word("${V/*b*a*b/}", &long).unwrap().value, "");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics(input in "\\PC{0,40}", escape in prop::sample::select(vec!['\\', '`'])) {
                let vars = env(&[("A", "x y"), ("B", ""), ("한", "*?")]);
                let lexer = Lexer::new(escape);
                let _ = lexer.process_word(&input, &vars);
                let _ = lexer.process_words(&input, &vars);
            }

            #[test]
            fn shell_syntax_soup_never_panics(
                input in proptest::collection::vec(
                    prop::sample::select(vec![
                        "$", "{", "}", ":", "-", "+", "?", "#", "%", "/", "*", "\\", "\"", "'",
                        "A", "B", "한", " ", "\n", "[", "1", "`", "=",
                    ]),
                    0..40,
                )
            ) {
                let input: String = input.concat();
                let vars = env(&[("A", "a*b/한?"), ("B", "")]);
                for escape in ['\\', '`'] {
                    let _ = Lexer::new(escape).process_word(&input, &vars);
                    let _ = Lexer::new(escape).process_words(&input, &vars);
                }
            }

            #[test]
            fn plain_words_unchanged(input in "[^$'\"\\\\`\\s]{0,40}") {
                let vars = env(&[("A", "x")]);
                let one = Lexer::new('\\').process_word(&input, &vars).unwrap();
                prop_assert_eq!(&one.value, &input);
                prop_assert!(one.used.is_empty());
                let many = Lexer::new('\\').process_words(&input, &vars).unwrap().value;
                let expected: Vec<String> =
                    if input.is_empty() { vec![] } else { vec![input.clone()] };
                prop_assert_eq!(many, expected);
            }

            #[test]
            fn replace_matches_naive(
                value in "[ab\n]{0,8}",
                pattern in proptest::collection::vec(
                    prop::sample::select(vec!["a", "b", "*", "?"]), 0..5),
            ) {
                let pattern = pattern.concat();
                let tokens = parse_pattern(&pattern).unwrap();
                // Naive leftmost-longest search by brute force.
                let naive = (0..=value.len()).find_map(|a| {
                    (a..=value.len()).rev().find(|&b| full_match(&tokens, &value[a..b])).map(|b| (a, b))
                });
                prop_assert_eq!(find(&tokens, &value, 0), naive);
                let shortest = (0..=value.len()).find(|&e| full_match(&tokens, &value[..e]));
                prop_assert_eq!(anchored_match(&tokens, 0, value.char_indices().map(|(i, c)| (i + c.len_utf8(), c)), false), shortest);
            }

            #[test]
            fn trims_match_naive(
                value in "[ab\n]{0,8}",
                pattern in proptest::collection::vec(
                    prop::sample::select(vec!["a", "b", "*", "?"]), 0..5),
                longest in any::<bool>(),
            ) {
                let tokens = parse_pattern(&pattern.concat()).unwrap();
                let mut ends: Vec<usize> =
                    (0..=value.len()).filter(|&e| full_match(&tokens, &value[..e])).collect();
                if !longest {
                    ends.reverse();
                }
                let naive_prefix = ends.last().map_or(value.as_str(), |&e| &value[e..]);
                prop_assert_eq!(trim_prefix(&tokens, &value, longest), naive_prefix);
                let mut starts: Vec<usize> =
                    (0..=value.len()).filter(|&s| full_match(&tokens, &value[s..])).collect();
                if longest {
                    starts.reverse();
                }
                let naive_suffix = starts.last().map_or(value.as_str(), |&s| &value[..s]);
                prop_assert_eq!(trim_suffix(&tokens, &value, longest), naive_suffix);
            }
        }

        /// Exponential reference matcher for tiny inputs.
        fn full_match(tokens: &[Tok], s: &str) -> bool {
            match tokens.split_first() {
                None => s.is_empty(),
                Some((Tok::Star, rest)) => {
                    let mut i = 0;
                    loop {
                        if full_match(rest, &s[i..]) {
                            return true;
                        }
                        match s[i..].chars().next() {
                            Some(c) if c != '\n' => i += c.len_utf8(),
                            _ => return false,
                        }
                    }
                }
                Some((t, rest)) => match s.chars().next() {
                    Some(c) if (*t == Tok::Any && c != '\n') || *t == Tok::Lit(c) => {
                        full_match(rest, &s[c.len_utf8()..])
                    }
                    _ => false,
                },
            }
        }
    }
}
