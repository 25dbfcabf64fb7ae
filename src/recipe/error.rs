//! The recipe error type: a message located at `file:line:col`, rendered with the source line
//! and a caret under the column.

use std::fmt;

/// An error in a recipe (syntax or validation), located in the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct RecipeError {
    /// The recipe's file name, as given by the caller.
    pub file: String,
    /// 1-based line of the error.
    pub line: usize,
    /// 1-based column (in characters) of the error.
    pub col: usize,
    /// What is wrong.
    pub message: String,
    /// The text of the source line (without its line ending).
    pub source_line: String,
}

impl RecipeError {
    /// Builds an error at `line` and byte offset `byte` within that line of `index`.
    pub(crate) fn at(
        file: &str,
        index: &LineIndex<'_>,
        line: usize,
        byte: usize,
        message: impl Into<String>,
    ) -> RecipeError {
        let text = index.line_text(line);
        let mut cut = byte.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        RecipeError {
            file: file.to_string(),
            line: line.max(1),
            col: text[..cut].chars().count() + 1,
            message: message.into(),
            source_line: text.to_string(),
        }
    }

    /// An error about `word` of the instruction starting on `line` of the recipe `text`,
    /// located at byte `offset` of the word: the word as written is looked for from that line
    /// on (at the instruction's line, column 1, when it is not found verbatim, e.g. split by
    /// a line continuation).
    pub fn in_word(
        file: &str,
        text: &[u8],
        line: usize,
        word: &str,
        offset: usize,
        message: impl Into<String>,
    ) -> RecipeError {
        let text = String::from_utf8_lossy(text);
        let index = LineIndex::new(&text);
        let start = index.line_start(line);
        match text.get(start..).and_then(|rest| rest.find(word)) {
            Some(found) if !word.is_empty() => {
                let at = start + found + offset.min(word.len());
                let hit = index.starts.partition_point(|s| *s <= at).max(1);
                let byte = at - index.line_start(hit);
                RecipeError::at(file, &index, hit, byte, message)
            }
            _ => RecipeError::at(file, &index, line, 0, message),
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    fn write_to(&self, f: &mut impl fmt::Write) -> fmt::Result {
        writeln!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )?;
        f.write_str(&quoted_line(self.line, self.col, &self.source_line))
    }
}

/// The recipe line `line` numbered, and under it a caret at column `col` (two lines, no final
/// newline), as errors and build-check findings show where they are.
pub(crate) fn quoted_line(line: usize, col: usize, source_line: &str) -> String {
    let num = line.to_string();
    // Keep tabs so the caret lines up under tabbed text; past the end of the line, spaces.
    let mut pad: String = source_line
        .chars()
        .take(col.saturating_sub(1))
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    let missing = col.saturating_sub(1).saturating_sub(pad.chars().count());
    pad.push_str(&" ".repeat(missing));
    format!(
        "   {num} | {source_line}\n   {} | {pad}^",
        " ".repeat(num.len())
    )
}

/// Line starts of a recipe text, to turn byte positions into lines and show source lines.
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    /// Indexes `text`; a UTF-8 BOM at the start is not part of line 1.
    pub(crate) fn new(text: &'a str) -> LineIndex<'a> {
        let first = if text.starts_with('\u{FEFF}') { 3 } else { 0 };
        let mut starts = vec![first];
        starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { text, starts }
    }

    /// Byte offset where 1-based `line` starts (the end of the text past the last line).
    pub(crate) fn line_start(&self, line: usize) -> usize {
        self.starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(self.text.len())
    }

    /// Number of lines (a final newline does not start another line).
    pub(crate) fn line_count(&self) -> usize {
        if self.text.ends_with('\n') {
            self.starts.len() - 1
        } else {
            self.starts.len()
        }
    }

    /// The text of 1-based `line` without its line ending.
    pub(crate) fn line_text(&self, line: usize) -> &'a str {
        let start = self.line_start(line);
        let end = self
            .starts
            .get(line)
            .map(|e| e - 1)
            .unwrap_or(self.text.len())
            .max(start);
        self.text[start..end].trim_end_matches(['\r', '\n'])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_caret_under_column() {
        let text = "FROM a\nCOPY --bogus x y\n";
        let idx = LineIndex::new(text);
        let e = RecipeError::at("Dockerfile", &idx, 2, 5, "unknown flag");
        assert_eq!(
            e.to_string(),
            "Dockerfile:2:6: unknown flag\n   2 | COPY --bogus x y\n     |      ^"
        );
    }

    #[test]
    fn words_are_found_from_their_line() {
        let text = b"FROM a\nENV A=$B\nENV C=x \\\n  D=$B$E\n";
        let e = RecipeError::in_word("f", text, 3, "$B$E", 2, "m");
        assert_eq!((e.line, e.col), (4, 7));
        let e = RecipeError::in_word("f", text, 2, "$B", 0, "m");
        assert_eq!((e.line, e.col), (2, 7));
        let e = RecipeError::in_word("f", text, 2, "nowhere", 3, "m");
        assert_eq!((e.line, e.col), (2, 1));
    }

    #[test]
    fn gutter_follows_line_number_width() {
        let text = "\n\n\n\n\n\n\n\n\nFROM\n";
        let idx = LineIndex::new(text);
        let e = RecipeError::at("f", &idx, 10, 0, "m");
        assert_eq!(e.to_string(), "f:10:1: m\n   10 | FROM\n      | ^");
    }
}
