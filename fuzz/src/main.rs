//! One AFL++ fuzz target binary for every target of `brainai::fuzzing`, chosen by the
//! `BRAINAI_FUZZ_TARGET` environment variable (see `make fuzz`).

fn main() {
    let name = std::env::var("BRAINAI_FUZZ_TARGET").unwrap_or_default();
    let Some(&(_, target)) = brainai::fuzzing::TARGETS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = brainai::fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("set BRAINAI_FUZZ_TARGET to one of {names:?}");
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
