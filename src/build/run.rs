//! RUN steps: the argv (shell form, exec form, heredocs), the environment a step sees, its
//! `--mount`s, and running it in the sandbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::{DEFAULT_PATH, command_argv, get_env, set_env};
use super::{BuildError, Engine, StageState, StepPlace};
use crate::plan::{self, CopySource, StepInputs};
use crate::recipe::instructions::{CommandLine, Instruction, Run};
use crate::rootfs::RootDir;
use crate::sandbox::{self, BindMount, NetworkMode, RunSpec};
use crate::snapshot;

/// A RUN mount, as the sandbox gets it.
enum RunMount {
    /// A host path bound as it is (secrets, cache dirs, tmpfs scratch, read-only context paths).
    Host(BindMount),
    /// A path of a tree mounted for the step.
    Tree(MountedTree),
    /// A forwarded ssh-agent socket; the step's `SSH_AUTH_SOCK` names the first one.
    Agent(BindMount),
    /// An optional mount whose source was not given (`type=ssh` without `--ssh`).
    Skipped,
}

/// A tree (a stage's or image's layers, or the context) mounted as an overlay over a scratch
/// upper for one RUN step, of which `source` is bound at `target`; writes are discarded.
struct MountedTree {
    /// Overlay lower dirs, top first.
    lowers: Vec<PathBuf>,
    /// The path bound, inside the tree.
    source: String,
    /// Where it appears in the step.
    target: String,
    /// Read-only bind.
    readonly: bool,
    /// Identity of the tree's content, for the cache key.
    key: String,
}

impl Engine<'_> {
    /// The environment a RUN step sees: image env, ARGs in scope (ENV wins), proxy build args.
    fn run_env(&self, st: &StageState) -> Vec<(String, String)> {
        let mut env: Vec<String> = st.config.config.env.clone();
        for (k, v) in &st.args {
            if get_env(&env, k).is_none() {
                set_env(&mut env, k, v);
            }
        }
        for k in plan::PROXY_ARGS {
            if let Some(v) = self.opts.build_args.get(k)
                && get_env(&env, k).is_none()
            {
                set_env(&mut env, k, v);
            }
        }
        if get_env(&env, "PATH").is_none() {
            set_env(&mut env, "PATH", DEFAULT_PATH);
        }
        let user = st.config.config.user.as_deref().unwrap_or("");
        if get_env(&env, "HOME").is_none()
            && matches!(user.split(':').next(), Some("" | "root" | "0"))
        {
            set_env(&mut env, "HOME", "/root");
        }
        env.into_iter()
            .filter_map(|e| {
                e.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    }

    /// What a RUN's result depends on besides its parent: the command, the image env, the
    /// ARGs in scope (a RUN sees them all), user, workdir and shell.
    fn run_inputs(&self, st: &StageState, instruction: String) -> StepInputs {
        StepInputs {
            instruction,
            env: st
                .config
                .config
                .env
                .iter()
                .filter_map(|e| {
                    e.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect(),
            args: st.args.clone(),
            user: st.config.config.user.clone().unwrap_or_default(),
            workdir: st.config.config.working_dir.clone().unwrap_or_default(),
            shell: st.shell.clone(),
            ..Default::default()
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_step(
        &self,
        stage: usize,
        n: usize,
        st: &mut StageState,
        instr: &Instruction,
        run: &Run,
        step: crate::progress::Step<'_>,
        deps: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<(), BuildError> {
        let line = instr.span.start_line;
        let (argv, stdin) = run_argv(run, &st.shell);
        let mut network = self.opts.network;
        if let Some(net) = &run.network {
            network = match net.as_str() {
                "none" => NetworkMode::None,
                "host" | "default" => NetworkMode::Host,
                other => {
                    return Err(self.invalid(line, format!("unsupported RUN --network={other}")));
                }
            };
        }
        match run.security.as_deref() {
            None | Some("sandbox") => {}
            Some(other) => {
                return Err(self.invalid(
                    line,
                    format!(
                        "RUN --security={other} is not supported: RUN steps always run sandboxed"
                    ),
                ));
            }
        }
        let vars = self.vars(st);
        let mut binds = Vec::new();
        let mut trees: Vec<MountedTree> = Vec::new();
        let mut _mount_scratch = Vec::new();
        let mut agent_sockets: Vec<String> = Vec::new();
        for m in &run.mounts {
            let expanded = self.expand(m, &vars, line)?;
            match self.run_mount(stage, m, &expanded, line, deps, agent_sockets.len())? {
                (RunMount::Host(bind), scratch) => {
                    binds.push(bind);
                    _mount_scratch.extend(scratch);
                }
                (RunMount::Tree(tree), _) => trees.push(tree),
                (RunMount::Agent(bind), _) => {
                    agent_sockets.push(bind.target.clone());
                    binds.push(bind);
                }
                (RunMount::Skipped, _) => {}
            }
        }
        if trees.len() > 1 {
            return Err(self.invalid(
                line,
                "only one --mount=type=bind with from= or rw per RUN is supported",
            ));
        }
        let mut inputs = self.run_inputs(
            st,
            format!("RUN {}", serde_json::to_string(&argv).unwrap_or_default()),
        );
        if !run.mounts.is_empty() {
            inputs
                .instruction
                .push_str(&format!(" mounts={:?}", run.mounts));
        }
        if let Some(tree) = trees.first() {
            inputs.from = tree.key.clone();
        }
        let parent = st.key;
        let key = plan::cache_key(&parent, &inputs);
        let used_args: Vec<&str> = st.args.keys().map(String::as_str).collect();
        let created_by = if used_args.is_empty() {
            format!("RUN {}", argv.join(" "))
        } else {
            format!(
                "RUN |{} {} {}",
                used_args.len(),
                used_args.join(" "),
                argv.join(" ")
            )
        };
        let place = StepPlace {
            stage,
            n,
            line,
            created_by,
        };
        let Some((mut step, _claim)) =
            self.reuse_cached(st, &place, (parent, key), &inputs, step)?
        else {
            return Ok(());
        };
        let (scratch, upper, work) = self.scratch_upper(stage, line)?;
        let speculation = self.speculate(&upper, scratch.path());
        let spec = RunSpec {
            lower_dirs: self.lowers(st)?,
            upper_dir: upper.clone(),
            work_dir: work,
            argv: argv.clone(),
            env: {
                let mut env = self.run_env(st);
                if let Some(sock) = agent_sockets.first() {
                    env.push(("SSH_AUTH_SOCK".to_string(), sock.clone()));
                }
                env
            },
            cwd: st
                .config
                .config
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".to_string()),
            user: st.config.config.user.clone().unwrap_or_default(),
            hostname: "kiln".to_string(),
            network,
            stdin,
            binds,
        };
        let result = match trees.pop() {
            None => self
                .sandbox
                .run(&spec, &mut |bytes| step.output(bytes), self.cancel),
            Some(tree) => {
                let (_tree_scratch, tree_upper, tree_work) = self.scratch_upper(stage, line)?;
                let step = &mut step;
                sandbox::with_rootfs(&tree.lowers, &tree_upper, &tree_work, move |merged| {
                    let root = RootDir::open_host(merged)
                        .map_err(|e| sandbox::SandboxError::Setup(e.to_string()))?;
                    let source = root
                        .resolve(&tree.source)
                        .map_err(|e| sandbox::SandboxError::Setup(e.to_string()))?;
                    let mut spec = spec;
                    spec.binds.push(BindMount {
                        source,
                        target: tree.target,
                        readonly: tree.readonly,
                    });
                    self.sandbox
                        .run(&spec, &mut |bytes| step.output(bytes), self.cancel)
                })
                .and_then(|r| r)
            }
        };
        let pre = speculation.map(snapshot::Speculation::finish);
        let code = match result {
            Ok(code) => code,
            Err(sandbox::SandboxError::Cancelled) => {
                step.failed();
                return Err(BuildError::Cancelled);
            }
            Err(sandbox::SandboxError::LimitReached(hit)) => {
                step.failed();
                return Err(BuildError::StepKilled {
                    stage: self.stage_name(stage),
                    file: self.file.clone(),
                    line,
                    command: instr.text.clone(),
                    cause: hit.to_string(),
                });
            }
            Err(e) => {
                step.failed();
                return Err(self.step_error(stage, line, e));
            }
        };
        if code != 0 {
            step.failed();
            return Err(BuildError::StepFailed {
                stage: self.stage_name(stage),
                file: self.file.clone(),
                line,
                command: instr.text.clone(),
                code,
            });
        }
        let pre = pre.unwrap_or_default();
        self.commit_step(st, place, parent, key, inputs, (&upper, &pre), step)
    }

    /// Starts compressing the step's big output files on idle CPU while it runs (gzip layers,
    /// several cores); `None` when that cannot help or cannot start.
    fn speculate(&self, upper: &Path, scratch: &Path) -> Option<snapshot::Speculation> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.opts.compression != snapshot::Compression::Gzip || cores < 2 {
            return None;
        }
        let spool = scratch.join("spool");
        std::fs::create_dir(&spool).ok()?;
        snapshot::Speculation::start(upper, &spool).ok()
    }

    /// One `RUN --mount=…` as a bind mount for the sandbox. Supported types:
    /// `secret` (a `--secret` file, read-only, default target `/run/secrets/ID`), `cache` (a
    /// directory kept in the store across builds, by `id`, default the target), `tmpfs` (an
    /// empty directory discarded after the step), `bind` (a context path, read-only, or a
    /// stage's or image's files) and `ssh` (an `--ssh` agent socket, default target
    /// `/run/buildkit/ssh_agent.N` with N = `index`, skipped when not given unless `required`).
    /// The returned scratch dir, if any, must live until the step ends.
    fn run_mount(
        &self,
        stage: usize,
        raw: &str,
        spec: &str,
        line: usize,
        deps: &BTreeMap<usize, Arc<StageState>>,
        index: usize,
    ) -> Result<(RunMount, Option<tempfile::TempDir>), BuildError> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for field in spec.split(',').filter(|f| !f.is_empty()) {
            let (k, v) = field.split_once('=').unwrap_or((field, ""));
            let k = match k {
                "dst" | "destination" => "target",
                "src" => "source",
                "readonly" => "ro",
                k => k,
            };
            fields.insert(k, v);
        }
        let kind = fields.get("type").copied().unwrap_or("bind");
        let target = fields.get("target").map(|t| t.to_string());
        let need_target = || {
            target
                .clone()
                .filter(|t| t.starts_with('/'))
                .ok_or_else(|| {
                    self.invalid(
                        line,
                        format!("RUN --mount type={kind} needs an absolute target="),
                    )
                })
        };
        match kind {
            "secret" => {
                let id = fields
                    .get("id")
                    .map(|s| s.to_string())
                    .or_else(|| {
                        target
                            .as_ref()
                            .and_then(|t| t.rsplit('/').next().map(str::to_string))
                    })
                    .ok_or_else(|| {
                        self.invalid(line, "RUN --mount=type=secret needs id= or target=")
                    })?;
                let target = target.unwrap_or_else(|| format!("/run/secrets/{id}"));
                match self.opts.secrets.get(&id) {
                    Some(src) => Ok((
                        RunMount::Host(BindMount {
                            source: src.clone(),
                            target,
                            readonly: true,
                        }),
                        None,
                    )),
                    None => Err(self.invalid(
                        line,
                        format!("secret {id:?} was not given: pass --secret id={id},src=PATH"),
                    )),
                }
            }
            "ssh" => {
                if let Some(opt) = ["uid", "gid", "mode"]
                    .iter()
                    .find(|o| fields.contains_key(**o))
                {
                    return Err(self.invalid(
                        line,
                        format!(
                            "RUN --mount=type=ssh,{opt}= is not supported: the agent socket is \
                             bound as it is (reachable by root in the step)"
                        ),
                    ));
                }
                let id = fields.get("id").copied().unwrap_or("default");
                let required = fields
                    .get("required")
                    .is_some_and(|v| v.is_empty() || *v == "true");
                let target = target.unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{index}"));
                match self.opts.ssh.get(id) {
                    Some(socket) => Ok((
                        RunMount::Agent(BindMount {
                            source: socket.clone(),
                            target,
                            readonly: false,
                        }),
                        None,
                    )),
                    None if required => Err(self.invalid(
                        line,
                        format!("ssh agent {id:?} was not forwarded: pass --ssh {id}[=SOCKET]"),
                    )),
                    None => Ok((RunMount::Skipped, None)),
                }
            }
            "cache" => {
                let target = need_target()?;
                let id = fields
                    .get("id")
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| target.clone());
                let dir = self.store.cache_mount_dir(&id)?;
                let readonly = fields.contains_key("ro");
                Ok((
                    RunMount::Host(BindMount {
                        source: dir,
                        target,
                        readonly,
                    }),
                    None,
                ))
            }
            "tmpfs" => {
                let target = need_target()?;
                let scratch = self.store.scratch_dir()?;
                Ok((
                    RunMount::Host(BindMount {
                        source: scratch.path().to_path_buf(),
                        target,
                        readonly: false,
                    }),
                    Some(scratch),
                ))
            }
            "bind" => {
                let target = need_target()?;
                let readonly = !fields
                    .get("rw")
                    .is_some_and(|v| v.is_empty() || *v == "true");
                let source = fields.get("source").copied().unwrap_or("/");
                let from_raw = plan::mount_from(raw);
                if from_raw.is_none() && readonly {
                    let rel = self
                        .context
                        .resolve(source)
                        .map_err(self.context_err(line))?;
                    let rel = rel.into_iter().next().unwrap_or_default();
                    let bind = BindMount {
                        source: self.context.host_path(&rel),
                        target,
                        readonly: true,
                    };
                    return Ok((RunMount::Host(bind), None));
                }
                // A stage's or image's files, or context files that may be written: mounted for
                // the step over a scratch upper, so whatever the step writes there is discarded.
                let (lowers, key) = match from_raw {
                    None => (
                        vec![self.context.root().to_path_buf()],
                        "context".to_string(),
                    ),
                    Some(raw_from) => {
                        let state = match self.plan.stages[stage].copy_sources.get(raw_from) {
                            Some(CopySource::Stage(i)) => (*deps[i]).clone(),
                            Some(CopySource::Image(r)) => {
                                self.load_image(r, line, &self.plan.stages[stage].platform)?
                            }
                            None => {
                                return Err(
                                    self.invalid(line, format!("unresolved from={raw_from}"))
                                );
                            }
                        };
                        (self.lowers(&state)?, state.key.to_string())
                    }
                };
                let tree = MountedTree {
                    lowers,
                    source: source.to_string(),
                    target,
                    readonly,
                    key,
                };
                Ok((RunMount::Tree(tree), None))
            }
            other => Err(self.invalid(
                line,
                format!(
                    "RUN --mount type={other} is not supported (secret, ssh, cache, tmpfs, bind)"
                ),
            )),
        }
    }
}

/// The argv and stdin for a RUN: exec form as is; shell form through the SHELL, with heredoc
/// bodies appended for the shell to read; a lone `<<EOF` runs its body as the script (through
/// its `#!` interpreter when it has one).
fn run_argv(run: &Run, shell: &[String]) -> (Vec<String>, Option<Vec<u8>>) {
    match &run.command {
        CommandLine::Exec(v) => (v.clone(), None),
        CommandLine::Shell(s) => {
            if run.heredocs.is_empty() {
                return (command_argv(&run.command, shell), None);
            }
            let lone = run.heredocs.len() == 1 && run.heredocs[0].fd.is_none() && {
                let t = s.trim();
                t.starts_with("<<") && !t.contains(char::is_whitespace)
            };
            if lone {
                let body = &run.heredocs[0].content;
                if let Some(first) = body.strip_prefix("#!") {
                    let interp: Vec<String> = first
                        .lines()
                        .next()
                        .unwrap_or("")
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                    if !interp.is_empty() {
                        let mut argv = interp;
                        argv.push("/dev/stdin".to_string());
                        return (argv, Some(body.as_bytes().to_vec()));
                    }
                }
                let mut argv = shell.to_vec();
                argv.push(body.clone());
                return (argv, None);
            }
            let mut script = s.clone();
            script.push('\n');
            for h in &run.heredocs {
                script.push_str(&h.content);
                if !h.content.is_empty() && !h.content.ends_with('\n') {
                    script.push('\n');
                }
                script.push_str(&h.name);
                script.push('\n');
            }
            let mut argv = shell.to_vec();
            argv.push(script);
            (argv, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::config::default_shell;
    use crate::recipe::instructions::Heredoc;

    fn heredoc(name: &str, content: &str) -> Heredoc {
        Heredoc {
            name: name.into(),
            content: content.into(),
            expand: true,
            fd: None,
        }
    }

    fn shell_run(command: &str, heredocs: Vec<Heredoc>) -> Run {
        Run {
            command: CommandLine::Shell(command.into()),
            heredocs,
            mounts: vec![],
            network: None,
            security: None,
        }
    }
    #[test]
    fn lone_heredoc_runs_its_body() {
        let run = shell_run("<<EOF", vec![heredoc("EOF", "echo hi\n")]);
        let (argv, stdin) = run_argv(&run, &default_shell());
        assert_eq!(argv, vec!["/bin/sh", "-c", "echo hi\n"]);
        assert!(stdin.is_none());
    }

    #[test]
    fn shebang_heredoc_uses_interpreter() {
        let run = shell_run(
            "<<EOF",
            vec![heredoc("EOF", "#!/bin/busybox sh\necho hi\n")],
        );
        let (argv, stdin) = run_argv(&run, &default_shell());
        assert_eq!(argv, vec!["/bin/busybox", "sh", "/dev/stdin"]);
        assert_eq!(stdin.unwrap(), b"#!/bin/busybox sh\necho hi\n");
    }

    #[test]
    fn heredoc_bodies_follow_the_command() {
        let run = shell_run(
            "cat <<A >a && cat <<B >b",
            vec![heredoc("A", "1\n"), heredoc("B", "2\n")],
        );
        let (argv, _) = run_argv(&run, &default_shell());
        assert_eq!(argv[2], "cat <<A >a && cat <<B >b\n1\nA\n2\nB\n");
    }
}
