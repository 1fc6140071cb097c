//! Human-readable output of `gc`, `fsck` and `repair` (on stdout; `--json`
//! prints the structures instead).

use cas_server::core::gc::{FsckReport, GcPlan, GcReport, Problem, RepairReport, Tally};

fn tally(t: &Tally) -> String {
    format!("{} xorbs ({} bytes)", t.xorbs, t.bytes)
}

pub fn gc_plan(p: &GcPlan) {
    let r = &p.roots;
    println!(
        "roots: {} refs ({} commits), {} uploads without a repository",
        r.refs, r.commits, r.roots
    );
    println!("live: {} files in {}", p.live_files, tally(&p.live));
    println!("dead files (leave the index): {}", p.dead_files.len());
    println!("condemn (unreferenced; leave dedup): {}", tally(&p.condemn));
    println!(
        "wait (condemned, grace period of {}s not over): {}",
        p.grace_secs,
        tally(&p.wait)
    );
    println!("delete (condemned, grace over): {}", tally(&p.delete));
    println!("recover (referenced again): {}", tally(&p.recover));
    println!(
        "partly live xorbs: {} listed, {} dead bytes in all (not repacked)",
        p.partial.len(),
        p.partial_dead_bytes
    );
    for x in &p.xorbs {
        println!(
            "  {:?} {} {:?} {} bytes",
            x.action, x.xorb, x.reason, x.bytes
        );
    }
}

pub fn gc_report(r: &GcReport) {
    println!(
        "done: {} files removed, {} condemned, {} recovered, {} deleted: {} bytes freed{}",
        r.files_removed,
        r.condemned.xorbs,
        r.recovered.xorbs,
        r.deleted.xorbs,
        r.deleted.bytes,
        if r.skipped_leased + r.files_leased > 0 {
            format!(
                "; {} xorbs and {} files kept (leased by uploads or commits since the plan)",
                r.skipped_leased, r.files_leased
            )
        } else {
            String::new()
        }
    );
}

fn problem(p: &Problem) -> String {
    match p {
        Problem::MissingXorb { xorb } => format!("xorb {xorb}: object missing"),
        Problem::WrongLength {
            xorb,
            stored,
            expected,
        } => format!("xorb {xorb}: object is {stored} bytes, its header says {expected}"),
        Problem::CorruptXorb { xorb, reason } => format!("xorb {xorb}: corrupt: {reason}"),
        Problem::DamagedXorb { xorb } => {
            format!("xorb {xorb}: marked damaged; an upload of its content heals it")
        }
        Problem::BadRecipe { file, reason } => format!("file {file}: {reason}"),
        Problem::BadCommit { reference, reason } => format!("{reference}: {reason}"),
        Problem::BadTree { tree, reason } => format!("tree {tree}: {reason}"),
        Problem::MissingRoot { file } => format!("root {file}: file not stored"),
    }
}

pub fn fsck(r: &FsckReport) {
    println!(
        "checked {} xorbs{}, {} files, {} refs ({} commits), {} roots; {} orphan objects",
        r.xorbs,
        if r.full { " (bytes verified)" } else { "" },
        r.files,
        r.refs,
        r.commits,
        r.roots,
        r.orphans
    );
    for p in &r.problems {
        println!("problem: {}", problem(p));
    }
    for f in &r.damaged_files {
        println!("damaged file: {f}");
    }
    for repo in &r.damaged_repos {
        println!("damaged repository: {repo}");
    }
    println!("{}", if r.clean { "clean" } else { "NOT clean" });
}

pub fn repair(r: &RepairReport) {
    fsck(&r.fsck);
    for x in &r.marked_damaged {
        println!("marked damaged: xorb {x}");
    }
    for f in &r.dropped_files {
        println!("dropped recipe: file {f}");
    }
    for f in &r.lost_files {
        println!("lost until uploaded again: file {f}");
    }
    for repo in &r.damaged_repos {
        println!("lost until uploaded again: repository {repo}");
    }
}
