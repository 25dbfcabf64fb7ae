//! Property tests: `parse` never panics; generated well-formed recipes keep their key facts.

use kiln::recipe::instructions::InstructionKind;
use kiln::recipe::parser::Arg;
use kiln::recipe::{parse, parse_syntax};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_bytes(src in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse(&src, "Dockerfile");
    }

    #[test]
    fn parse_never_panics_on_dockerfile_like_text(
        src in "([A-Za-z]{0,8}|--[a-z]{1,6}(=[a-z\"' ]{0,4})?|<<-?[A-Z\"']{0,4}|[\\[\\]\",'\\\\` #=\t]|\r?\n){0,60}"
    ) {
        let _ = parse(src.as_bytes(), "Dockerfile");
        let _ = parse(format!("# escape=`\n{src}").as_bytes(), "Dockerfile");
    }

    #[test]
    fn generated_recipes_round_trip(
        image in "[a-z][a-z0-9]{0,8}(:[a-z0-9.]{1,6})?",
        stage in "[a-z][a-z0-9_.-]{0,8}",
        cmds in proptest::collection::vec("[a-z][a-z0-9 ./=-]{0,20}[a-z0-9]", 1..6),
        key in "[A-Z][A-Z0-9_]{0,8}",
        value in "[a-z0-9/.:]{1,12}",
        continued in any::<bool>(),
        lower in any::<bool>(),
    ) {
        let kw = |k: &str| if lower { k.to_lowercase() } else { k.to_string() };
        let mut src = format!("{} {image} AS {stage}\n{} {key}={value}\n", kw("FROM"), kw("ENV"));
        for c in &cmds {
            if continued {
                src.push_str(&format!("{} {c} \\\n  && true\n", kw("RUN")));
            } else {
                src.push_str(&format!("{} {c}\n", kw("RUN")));
            }
        }
        let ast = parse_syntax(src.as_bytes(), "Dockerfile").expect("syntax");
        prop_assert_eq!(ast.nodes.len(), cmds.len() + 2);
        let lines_per_run = if continued { 2 } else { 1 };
        prop_assert_eq!(ast.end_line, 2 + cmds.len() * lines_per_run);
        for (i, c) in cmds.iter().enumerate() {
            let node = &ast.nodes[i + 2];
            prop_assert_eq!(node.start_line, 3 + i * lines_per_run);
            let want = if continued { format!("{c}   && true") } else { c.clone() };
            prop_assert_eq!(&node.args, &vec![Arg::Word { text: want, offset: 4 }]);
        }
        let recipe = parse(src.as_bytes(), "Dockerfile").expect("recipe");
        prop_assert_eq!(recipe.stages.len(), 1);
        prop_assert_eq!(recipe.stages[0].name.as_deref(), Some(stage.as_str()));
        prop_assert_eq!(&recipe.stages[0].base, &image);
        let InstructionKind::Env(pairs) = &recipe.stages[0].instructions[0].kind else {
            panic!("ENV expected");
        };
        prop_assert_eq!(pairs, &vec![(key.clone(), value.clone())]);
        prop_assert_eq!(recipe.stages[0].instructions.len(), cmds.len() + 1);
    }
}
