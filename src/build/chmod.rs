//! `COPY/ADD --chmod`: an octal mode, or symbolic clauses as `chmod(1)` takes them (Dockerfile
//! 1.14: `go-w`, `u=rw,g=r,o=r`, `a+X`), applied to each copied entry's own mode.

/// A parsed `--chmod` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chmod {
    /// `0755`: every entry gets these bits.
    Octal(u32),
    /// `u+x,go-w`: each entry's mode, changed clause by clause.
    Symbolic(Vec<Clause>),
}

/// One `who op perms [op perms]...` clause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause {
    /// The bits `who` covers (u: 0o4700, g: 0o2070, o: 0o1007; none given: all of them).
    who: u32,
    /// The operations in order.
    ops: Vec<(Op, Perms)>,
}

/// `+`, `-` or `=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Set,
}

/// What an operation adds, removes or sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Perms {
    /// `rwxXst` letters.
    Letters {
        bits: u32,
        exec_if_dir_or_exec: bool,
    },
    /// `u`, `g` or `o`: the permission bits that class has now.
    CopyOf(u32),
}

const USER: u32 = 0o4700;
const GROUP: u32 = 0o2070;
const OTHER: u32 = 0o1007;

impl Chmod {
    /// Parses `--chmod`: octal up to `07777`, else symbolic clauses separated by commas.
    pub fn parse(s: &str) -> Result<Chmod, String> {
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            return u32::from_str_radix(s, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .map(Chmod::Octal)
                .ok_or_else(|| {
                    format!("invalid chmod parameter: '{s}'. it should be octal string and between 0 and 07777")
                });
        }
        let clauses = s
            .split(',')
            .map(parse_clause)
            .collect::<Option<Vec<_>>>()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("invalid chmod parameter: '{s}'"))?;
        Ok(Chmod::Symbolic(clauses))
    }

    /// The mode an entry whose own mode is `mode` gets (`is_dir`: `X` applies).
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let clauses = match self {
            Chmod::Octal(m) => return *m,
            Chmod::Symbolic(c) => c,
        };
        let mut mode = mode & 0o7777;
        for clause in clauses {
            for (op, perms) in &clause.ops {
                let bits = match *perms {
                    Perms::Letters {
                        bits,
                        exec_if_dir_or_exec,
                    } => {
                        let x = exec_if_dir_or_exec && (is_dir || mode & 0o111 != 0);
                        bits | if x { 0o111 } else { 0 }
                    }
                    Perms::CopyOf(class) => {
                        let shift = match class {
                            USER => 6,
                            GROUP => 3,
                            _ => 0,
                        };
                        ((mode >> shift) & 0o7) * 0o111
                    }
                } & clause.who;
                mode = match op {
                    Op::Add => mode | bits,
                    Op::Remove => mode & !bits,
                    Op::Set => (mode & !(clause.who & 0o7777 & !0o1000)) | bits,
                };
            }
        }
        mode
    }
}

/// `[ugoa]*([-+=]([rwxXst]*|[ugo]))+`.
fn parse_clause(s: &str) -> Option<Clause> {
    let mut chars = s.chars().peekable();
    let mut who = 0;
    while let Some(c) = chars.peek() {
        who |= match c {
            'u' => USER,
            'g' => GROUP,
            'o' => OTHER,
            'a' => USER | GROUP | OTHER,
            _ => break,
        };
        chars.next();
    }
    if who == 0 {
        who = USER | GROUP | OTHER;
    }
    let mut ops = Vec::new();
    while let Some(c) = chars.next() {
        let op = match c {
            '+' => Op::Add,
            '-' => Op::Remove,
            '=' => Op::Set,
            _ => return None,
        };
        let perms = match chars.peek() {
            Some(&c @ ('u' | 'g' | 'o')) => {
                chars.next();
                Perms::CopyOf(match c {
                    'u' => USER,
                    'g' => GROUP,
                    _ => OTHER,
                })
            }
            _ => {
                let (mut bits, mut exec_if_dir_or_exec) = (0, false);
                while let Some(c) = chars.peek() {
                    bits |= match c {
                        'r' => 0o444,
                        'w' => 0o222,
                        'x' => 0o111,
                        's' => 0o6000,
                        't' => 0o1000,
                        'X' => {
                            exec_if_dir_or_exec = true;
                            0
                        }
                        _ => break,
                    };
                    chars.next();
                }
                Perms::Letters {
                    bits,
                    exec_if_dir_or_exec,
                }
            }
        };
        ops.push((op, perms));
    }
    (!ops.is_empty()).then_some(Clause { who, ops })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str, mode: u32, is_dir: bool) -> u32 {
        Chmod::parse(s).unwrap().apply(mode, is_dir)
    }

    #[test]
    fn octal() {
        assert_eq!(Chmod::parse("755"), Ok(Chmod::Octal(0o755)));
        assert_eq!(Chmod::parse("04755"), Ok(Chmod::Octal(0o4755)));
        assert_eq!(Chmod::parse("0").unwrap().apply(0o644, false), 0);
        for bad in ["999", "10000", "64a"] {
            assert!(
                Chmod::parse(bad).unwrap_err().contains("octal string"),
                "{bad}"
            );
        }
    }

    /// The cases of BuildKit's testChmodNonOctal, against what chmod(1) gives.
    #[test]
    fn symbolic_as_chmod_does() {
        assert_eq!(sym("go-w", 0o666, false), 0o644);
        assert_eq!(sym("u=rw,g=r,o=r", 0o666, false), 0o644);
        assert_eq!(sym("a+X", 0o666, false), 0o666);
        assert_eq!(sym("a+X", 0o744, false), 0o755);
        assert_eq!(sym("go-w", 0o124, true), 0o104);
        assert_eq!(sym("u+rw,g+r,o-x,o+w", 0o124, true), 0o766);
        assert_eq!(sym("a+X", 0o124, true), 0o135);
        assert_eq!(sym("+x", 0o644, false), 0o755);
        assert_eq!(sym("u+s,o+t", 0o755, true), 0o5755);
        assert_eq!(sym("g=u", 0o740, false), 0o770);
        for bad in ["", "u", "z+x", "u+x,", "u*x"] {
            assert!(Chmod::parse(bad).is_err(), "{bad}");
        }
    }
}
