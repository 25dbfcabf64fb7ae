//! BuildKit's parser-test dump format (`Node.Dump()`), and Go's `strconv.Quote`.

use super::parser::{Arg, Ast, Node};

/// Renders the tree as BuildKit's `Node.Dump()` does: one s-expression per instruction, joined
/// by newlines, without a final newline (a corpus `result` file is `dump + "\n"`).
pub fn dump(ast: &Ast) -> String {
    let lines: Vec<String> = ast
        .nodes
        .iter()
        .map(|n| format!("({})", dump_node(n)))
        .collect();
    go_trim(&lines.join("\n")).to_string()
}

/// One node: lower-cased keyword, `[flags]`, then the quoted arguments or a nested `(node)`.
fn dump_node(node: &Node) -> String {
    let mut s = node.keyword.to_lowercase();
    if !node.flags.is_empty() {
        let flags: Vec<String> = node.flags.iter().map(|f| go_quote(&f.text)).collect();
        s.push_str(" [");
        s.push_str(&flags.join(" "));
        s.push(']');
    }
    for a in &node.args {
        s.push(' ');
        match a {
            Arg::Word { text, .. } => s.push_str(&go_quote(text)),
            Arg::Nested(child) => {
                s.push('(');
                s.push_str(&dump_node(child));
                s.push(')');
            }
        }
    }
    go_trim(&s).to_string()
}

/// Go `strings.TrimSpace`: leading and trailing Unicode white space.
fn go_trim(s: &str) -> &str {
    s.trim_matches(char::is_whitespace)
}

/// Go `unicode.IsPrint`: letters, marks, numbers, punctuation, symbols and the ASCII space.
fn go_is_print(c: char) -> bool {
    use pest::unicode::{LETTER, MARK, NUMBER, PUNCTUATION, SYMBOL};
    c == ' ' || LETTER(c) || MARK(c) || NUMBER(c) || PUNCTUATION(c) || SYMBOL(c)
}

/// Go `strconv.Quote`: a double-quoted string with Go escapes for non-printable characters.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c != '\u{7f}' && c >= ' ' && (c.is_ascii() || go_is_print(c)) => out.push(c),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::go_quote;

    #[test]
    fn quote_matches_go() {
        assert_eq!(go_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(
            go_quote("☃ \u{0} \u{7f} \u{85} \u{1F600}"),
            "\"☃ \\x00 \\x7f \\u0085 😀\""
        );
        assert_eq!(
            go_quote("\u{7}\u{8}\u{c}\n\r\t\u{b}\u{1}"),
            r#""\a\b\f\n\r\t\v\x01""#
        );
        assert_eq!(
            go_quote("\u{200b}\u{e000}\u{F0000}"),
            r#""\u200b\ue000\U000f0000""#
        );
    }
}
