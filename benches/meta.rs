//! The labfs benchmark driver: metadata and I/O workloads run against any directory
//! (a labfs mount, the native directory beneath it, or mergerfs over it), plus the
//! ratio report. `benches/run.sh` sets up the mounts and calls it once per measurement;
//! each workload command prints one line, `VALUE UNIT`.
//!
//! Uses the standard library only, so run.sh can compile it with a bare `rustc` while
//! the rest of the tree is mid-edit. `cargo bench --bench meta` (no arguments) runs a
//! small smoke test in a temporary directory.
//!
//! Commands (N = number of files; `--dirs D` spreads them over D subdirectories):
//!   create DIR N [--dirs D] [--size B]  create files of B bytes (default 512)   ops/s
//!   stat DIR N [--dirs D]               lstat each file                         ops/s
//!   readdir DIR [--reps R]              list the tree R times (no stat)         entries/s
//!   lsl DIR                             list the tree and lstat every entry     entries/s
//!   unlink DIR N [--dirs D]             remove the files (and the D dirs)       ops/s
//!   loop DIR N [--dirs D]               create, stat, list, unlink              s
//!   parallel DIR T N                    T threads, each create/stat/unlink N    ops/s
//!   populate DIR D F [--threads T]      D dirs of F empty files                 s
//!   walk DIR                            list + lstat the whole tree             s (count on stderr)
//!   io seqwrite FILE MIB                1 MiB writes, then fsync                MiB/s
//!   io seqread FILE                     1 MiB reads                             MiB/s
//!   io randread FILE SECS               4 KiB preads at random offsets          IOPS
//!   io randwrite FILE SECS              4 KiB pwrites at random offsets + fsync IOPS
//!   report TSV [--max-load L]           the ratio table of a run's results
//!   smoke                               every workload, small, in a temp dir

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: impl AsRef<Path>) -> impl FnOnce(E) -> String {
    let w = what.as_ref().display().to_string();
    move |e| format!("{w}: {e}")
}

/// Where the files of a layout live: flat (`dirs == 0`) or spread over `dirs` subdirs.
#[derive(Clone, Copy)]
struct Layout {
    n: usize,
    dirs: usize,
}

impl Layout {
    fn dir_of(&self, root: &Path, d: usize) -> PathBuf {
        if self.dirs == 0 {
            root.to_path_buf()
        } else {
            root.join(format!("d{d:04}"))
        }
    }

    /// Every file path, grouped by directory.
    fn paths(&self, root: &Path) -> Vec<PathBuf> {
        let groups = self.dirs.max(1);
        let mut out = Vec::with_capacity(self.n);
        for i in 0..self.n {
            let d = i % groups;
            out.push(self.dir_of(root, d).join(format!("f{i:07}")));
        }
        out.sort();
        out
    }
}

fn rate(ops: usize, t: Duration) -> f64 {
    ops as f64 / t.as_secs_f64().max(1e-9)
}

fn create(root: &Path, l: Layout, size: usize) -> Res<f64> {
    let data = vec![b'x'; size];
    let t = Instant::now();
    let mut ops = 0;
    for d in 0..l.dirs {
        let p = l.dir_of(root, d);
        fs::create_dir(&p).map_err(err(&p))?;
        ops += 1;
    }
    for p in l.paths(root) {
        let mut f = File::create(&p).map_err(err(&p))?;
        if size > 0 {
            f.write_all(&data).map_err(err(&p))?;
        }
        ops += 1;
    }
    Ok(rate(ops, t.elapsed()))
}

fn stat(root: &Path, l: Layout) -> Res<f64> {
    let paths = l.paths(root);
    let t = Instant::now();
    for p in &paths {
        fs::symlink_metadata(p).map_err(err(p))?;
    }
    Ok(rate(paths.len(), t.elapsed()))
}

/// List `dir` recursively; with `with_stat`, lstat every entry too. Returns the count.
fn list(dir: &Path, with_stat: bool) -> Res<usize> {
    let mut n = 0;
    let mut sub = Vec::new();
    for e in fs::read_dir(dir).map_err(err(dir))? {
        let e = e.map_err(err(dir))?;
        n += 1;
        let is_dir = if with_stat {
            fs::symlink_metadata(e.path())
                .map_err(err(e.path()))?
                .is_dir()
        } else {
            e.file_type().map_err(err(e.path()))?.is_dir()
        };
        if is_dir {
            sub.push(e.path());
        }
    }
    for s in sub {
        n += list(&s, with_stat)?;
    }
    Ok(n)
}

fn readdir(root: &Path, reps: usize) -> Res<f64> {
    let t = Instant::now();
    let mut n = 0;
    for _ in 0..reps {
        n += list(root, false)?;
    }
    Ok(rate(n, t.elapsed()))
}

fn lsl(root: &Path) -> Res<f64> {
    let t = Instant::now();
    let n = list(root, true)?;
    Ok(rate(n, t.elapsed()))
}

fn unlink(root: &Path, l: Layout) -> Res<f64> {
    let paths = l.paths(root);
    let t = Instant::now();
    for p in &paths {
        fs::remove_file(p).map_err(err(p))?;
    }
    for d in 0..l.dirs {
        let p = l.dir_of(root, d);
        fs::remove_dir(&p).map_err(err(&p))?;
    }
    Ok(rate(paths.len() + l.dirs, t.elapsed()))
}

/// The whole 10,000-file loop in one go; seconds.
fn full_loop(root: &Path, l: Layout) -> Res<f64> {
    let t = Instant::now();
    create(root, l, 512)?;
    stat(root, l)?;
    readdir(root, 1)?;
    unlink(root, l)?;
    Ok(t.elapsed().as_secs_f64())
}

fn parallel(root: &Path, threads: usize, n: usize) -> Res<f64> {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut hs = Vec::new();
    for k in 0..threads {
        let dir = root.join(format!("t{k}"));
        fs::create_dir(&dir).map_err(err(&dir))?;
        let b = barrier.clone();
        hs.push(thread::spawn(move || -> Res<()> {
            let l = Layout { n, dirs: 0 };
            b.wait();
            create(&dir, l, 512)?;
            stat(&dir, l)?;
            unlink(&dir, l)?;
            Ok(())
        }));
    }
    barrier.wait();
    let t = Instant::now();
    for h in hs {
        h.join().map_err(|_| "a worker panicked".to_string())??;
    }
    let el = t.elapsed();
    for k in 0..threads {
        let dir = root.join(format!("t{k}"));
        fs::remove_dir(&dir).map_err(err(&dir))?;
    }
    Ok(rate(3 * n * threads, el))
}

fn populate(root: &Path, dirs: usize, files: usize, threads: usize) -> Res<f64> {
    let t = Instant::now();
    let threads = threads.max(1);
    let mut hs = Vec::new();
    for k in 0..threads {
        let root = root.to_path_buf();
        hs.push(thread::spawn(move || -> Res<()> {
            for d in (k..dirs).step_by(threads) {
                let dir = root.join(format!("d{d:04}"));
                fs::create_dir_all(&dir).map_err(err(&dir))?;
                for i in 0..files {
                    let p = dir.join(format!("f{i:07}"));
                    File::create(&p).map_err(err(&p))?;
                }
            }
            Ok(())
        }));
    }
    for h in hs {
        h.join().map_err(|_| "a worker panicked".to_string())??;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn walk(root: &Path) -> Res<f64> {
    let t = Instant::now();
    let n = list(root, true)?;
    eprintln!("walk: {n} entries");
    Ok(t.elapsed().as_secs_f64())
}

const MIB: usize = 1 << 20;

fn seqwrite(path: &Path, mib: usize) -> Res<f64> {
    let buf = vec![0x5a_u8; MIB];
    let t = Instant::now();
    let mut f = File::create(path).map_err(err(path))?;
    for _ in 0..mib {
        f.write_all(&buf).map_err(err(path))?;
    }
    f.sync_all().map_err(err(path))?;
    drop(f);
    Ok(mib as f64 / t.elapsed().as_secs_f64())
}

fn seqread(path: &Path) -> Res<f64> {
    let mut buf = vec![0u8; MIB];
    let t = Instant::now();
    let mut f = File::open(path).map_err(err(path))?;
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).map_err(err(path))?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(total as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

/// xorshift64*: reproducible offsets without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn randio(path: &Path, secs: f64, write: bool) -> Res<f64> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(err(path))?;
    let blocks = f.metadata().map_err(err(path))?.len() / 4096;
    if blocks == 0 {
        return Err(format!("{}: empty file", path.display()));
    }
    let mut buf = vec![0xa5_u8; 4096];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let limit = Duration::from_secs_f64(secs);
    let t = Instant::now();
    let mut ops = 0usize;
    while t.elapsed() < limit {
        for _ in 0..64 {
            let off = (rng.next() % blocks) * 4096;
            if write {
                f.write_all_at(&buf, off).map_err(err(path))?;
            } else {
                f.read_exact_at(&mut buf, off).map_err(err(path))?;
            }
            ops += 1;
        }
    }
    if write {
        f.sync_all().map_err(err(path))?;
    }
    Ok(rate(ops, t.elapsed()))
}

// ---- the report ----

/// How a workload is judged: the ratio of labfs to its reference.
#[derive(Clone, Copy, PartialEq)]
enum Goal {
    /// labfs throughput / native throughput at least this.
    Speed(f64),
    /// labfs time / native time at most this.
    Time(f64),
    /// Reported only.
    None,
}

/// The targets of issue 12 for one row: on local, on Atlas, and against the peers.
struct Goals {
    local: Goal,
    atlas: Goal,
    /// Local: at least this many times faster than every peer (labfs local vs each).
    local_vs_peers: Option<f64>,
    /// Atlas: labfs atlas / native atlas at least the best mergerfs / native local.
    atlas_ahead_of_mergerfs: bool,
}

fn goals_of(workload: &str) -> Goals {
    use Goal::{Speed, Time};
    let w = workload;
    let (local, atlas) = if w.starts_with("seq write") {
        (Speed(0.95), Speed(0.9))
    } else if w.starts_with("seq read") || w.starts_with("4k rand read (file in page cache)") {
        (Goal::None, Speed(0.9))
    } else if w.starts_with("4k rand write") {
        (Goal::None, Speed(0.8))
    } else if w.starts_with("stat warm") {
        (Goal::None, Speed(0.5))
    } else if w.starts_with("git status (warm)") {
        (Goal::None, Time(2.0))
    } else if w.starts_with("tar x") {
        (Time(2.5), Time(4.0))
    } else if w.starts_with("git clone --local") {
        (Time(1.5), Goal::None)
    } else if w.starts_with("readdir warm") {
        (Speed(0.9), Speed(0.5))
    } else if w.starts_with("readdir first after create") {
        (Speed(0.5), Speed(0.5))
    } else if w.contains("-file loop") {
        (Time(3.0), Goal::None)
    } else if w.starts_with("promote") {
        (Goal::None, Speed(0.9))
    } else {
        (Goal::None, Goal::None)
    };
    Goals {
        local,
        atlas,
        local_vs_peers: w.contains("-file loop").then_some(1.5),
        atlas_ahead_of_mergerfs: atlas != Goal::None && !w.starts_with("promote"),
    }
}

struct Row {
    workload: String,
    unit: String,
    med: BTreeMap<String, f64>,
    n: usize,
    /// 1-minute load averages at the start of the row's samples.
    loads: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn fmt_val(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// `a` relative to `reference`: speed ratio (higher is better) for rates, time ratio
/// (lower is better) for seconds.
fn ratio(row: &Row, a: &str, reference: &str) -> Option<f64> {
    let a = *row.med.get(a)?;
    let b = *row.med.get(reference)?;
    if a <= 0.0 || b <= 0.0 {
        return None;
    }
    Some(a / b)
}

fn is_time(unit: &str) -> bool {
    unit == "s"
}

/// Ratio `a` at least as good as ratio `b`.
fn as_good(unit: &str, a: f64, b: f64) -> bool {
    if is_time(unit) {
        a <= b
    } else {
        a >= b
    }
}

fn verdict(goal: Goal, r: Option<f64>) -> Option<bool> {
    match (goal, r) {
        (Goal::Speed(g), Some(r)) => Some(r >= g),
        (Goal::Time(g), Some(r)) => Some(r <= g),
        _ => None,
    }
}

fn goal_text(goal: Goal) -> String {
    match goal {
        Goal::Speed(g) => format!(">={g}x"),
        Goal::Time(g) => format!("<={g}x time"),
        Goal::None => "-".into(),
    }
}

fn yes_no(v: bool) -> &'static str {
    if v {
        "yes"
    } else {
        "NO"
    }
}

const PEERS: [&str; 3] = ["mergerfs", "mergerfs-off", "passthrough_hp"];

fn report(tsv: &Path, max_load: f64) -> Res<()> {
    let text = fs::read_to_string(tsv).map_err(err(tsv))?;
    // workload -> (unit, target -> values, loads), in first-seen order.
    type Samples = (String, BTreeMap<String, Vec<f64>>, Vec<f64>);
    let mut order: Vec<String> = Vec::new();
    let mut data: BTreeMap<String, Samples> = BTreeMap::new();
    let mut mem: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 4 || line.starts_with('#') {
            continue;
        }
        if f[0] == "memory" {
            mem.push((f[1].to_string(), format!("{} {}", f[2], f[3])));
            continue;
        }
        let Ok(v) = f[2].parse::<f64>() else { continue };
        let e = data.entry(f[0].to_string()).or_insert_with(|| {
            order.push(f[0].to_string());
            (f[3].to_string(), BTreeMap::new(), Vec::new())
        });
        e.1.entry(f[1].to_string()).or_default().push(v);
        if let Some(l) = f.get(4).and_then(|l| l.parse::<f64>().ok()) {
            e.2.push(l);
        }
    }
    let rows: Vec<Row> = order
        .iter()
        .map(|w| {
            let (unit, by, loads) = &data[w];
            let n = by.values().map(Vec::len).max().unwrap_or(0);
            let med = by
                .iter()
                .map(|(k, v)| {
                    let mut v = v.clone();
                    (k.clone(), median(&mut v))
                })
                .collect();
            Row {
                workload: w.clone(),
                unit: unit.clone(),
                med,
                n,
                loads: loads.clone(),
            }
        })
        .collect();

    let rat = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_default();
    let cell = |r: &Row, k: &str, reference: &str| match r.med.get(k) {
        None => "-".to_string(),
        Some(v) if k == reference => fmt_val(*v),
        Some(v) => format!("{} ({})", fmt_val(*v), rat(ratio(r, k, reference))),
    };

    println!("Medians of N samples; in brackets the ratio to native (local for the local");
    println!("targets and the peers, Atlas for the labfs Atlas targets): throughput ratio for");
    println!("rates (higher is better), time ratio for seconds (lower is better). The peers");
    println!("run over the local image. \"load\": the 1-minute load average at the start of");
    println!(
        "the row's samples, median / max; a row whose median is above {max_load} gets no verdict."
    );
    println!();
    println!("| workload | unit | N | load | native local | labfs local | mergerfs | mergerfs off | passthrough_hp | native atlas | labfs atlas | labfs atlas pt | target local / atlas | met |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut tally = (0, 0, 0); // met, missed, busy
    for r in &rows {
        let g = goals_of(&r.workload);
        let mut loads = r.loads.clone();
        let load_med = median(&mut loads);
        let load_max = r.loads.iter().copied().fold(f64::NAN, f64::max);
        let load = if r.loads.is_empty() {
            "-".to_string()
        } else {
            format!("{load_med:.1} / {load_max:.1}")
        };
        let mut met = Vec::new();
        if let Some(v) = verdict(g.local, ratio(r, "labfs-local", "native-local")) {
            met.push(format!("local {}", yes_no(v)));
        }
        if let Some(v) = verdict(g.atlas, ratio(r, "labfs-atlas", "native-atlas")) {
            met.push(format!("atlas {}", yes_no(v)));
        }
        if let Some(k) = g.local_vs_peers {
            let lab = r.med.get("labfs-local");
            for p in PEERS {
                if let (Some(l), Some(pv)) = (lab, r.med.get(p)) {
                    // How many times faster labfs is than the peer.
                    let faster = if is_time(&r.unit) { pv / l } else { l / pv };
                    met.push(format!("{faster:.2}x {p} {}", yes_no(faster >= k)));
                }
            }
        }
        if g.atlas_ahead_of_mergerfs {
            let ra = ratio(r, "labfs-atlas", "native-atlas");
            let best = ["mergerfs", "mergerfs-off"]
                .iter()
                .filter_map(|p| ratio(r, p, "native-local"))
                .reduce(|a, b| if as_good(&r.unit, a, b) { a } else { b });
            if let (Some(a), Some(b)) = (ra, best) {
                met.push(format!(
                    "atlas vs mergerfs {}",
                    yes_no(as_good(&r.unit, a, b))
                ));
            }
        }
        let mut met = met.join("; ");
        if !met.is_empty() {
            if load_med > max_load {
                met = format!("no verdict: busy (load {load_med:.1})");
                tally.2 += 1;
            } else if met.contains("NO") {
                tally.1 += 1;
            } else {
                tally.0 += 1;
            }
        }
        let tgt = if g.local == Goal::None && g.atlas == Goal::None {
            String::new()
        } else {
            format!("{} / {}", goal_text(g.local), goal_text(g.atlas))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.workload,
            r.unit,
            r.n,
            load,
            cell(r, "native-local", "native-local"),
            cell(r, "labfs-local", "native-local"),
            cell(r, "mergerfs", "native-local"),
            cell(r, "mergerfs-off", "native-local"),
            cell(r, "passthrough_hp", "native-local"),
            cell(r, "native-atlas", "native-atlas"),
            cell(r, "labfs-atlas", "native-atlas"),
            cell(r, "labfs-atlas-pt", "native-atlas"),
            tgt,
            met
        );
    }
    println!();
    println!(
        "rows with targets: {} met, {} with a miss, {} without a verdict (busy machine)",
        tally.0, tally.1, tally.2
    );
    if !mem.is_empty() {
        println!();
        println!("| memory (labfs daemon, local backend) | value |");
        println!("|---|---|");
        for (k, v) in &mem {
            println!("| {k} | {v} |");
        }
    }
    Ok(())
}

// ---- command line ----

fn flag(args: &mut Vec<String>, name: &str, default: usize) -> Res<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) if i + 1 < args.len() => {
            let v = args.remove(i + 1);
            args.remove(i);
            v.parse().map_err(|_| format!("{name}: not a number: {v}"))
        }
        Some(_) => Err(format!("{name} needs a value")),
        None => Ok(default),
    }
}

fn pos<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Res<T> {
    let s = args.get(i).ok_or_else(|| format!("missing {what}"))?;
    s.parse().map_err(|_| format!("{what}: cannot parse {s:?}"))
}

fn smoke() -> Res<()> {
    let base = std::env::temp_dir().join(format!("labfs-meta-smoke-{}", std::process::id()));
    fs::create_dir_all(&base).map_err(err(&base))?;
    let result = (|| -> Res<()> {
        for (name, l) in [
            ("flat", Layout { n: 300, dirs: 0 }),
            ("tree", Layout { n: 300, dirs: 10 }),
        ] {
            let d = base.join(name);
            fs::create_dir(&d).map_err(err(&d))?;
            println!("{name} create   {:>12.0} ops/s", create(&d, l, 512)?);
            println!("{name} stat     {:>12.0} ops/s", stat(&d, l)?);
            println!("{name} readdir  {:>12.0} entries/s", readdir(&d, 3)?);
            println!("{name} ls -l    {:>12.0} entries/s", lsl(&d)?);
            println!("{name} unlink   {:>12.0} ops/s", unlink(&d, l)?);
            println!("{name} loop     {:>12.4} s", full_loop(&d, l)?);
            fs::remove_dir(&d).map_err(err(&d))?;
        }
        println!("parallel 2 {:>12.0} ops/s", parallel(&base, 2, 100)?);
        let f = base.join("io");
        println!("seqwrite   {:>12.1} MiB/s", seqwrite(&f, 4)?);
        println!("seqread    {:>12.1} MiB/s", seqread(&f)?);
        println!("randread   {:>12.0} IOPS", randio(&f, 0.1, false)?);
        println!("randwrite  {:>12.0} IOPS", randio(&f, 0.1, true)?);
        Ok(())
    })();
    let _ = fs::remove_dir_all(&base);
    result?;
    println!("1 passed, 0 failed");
    Ok(())
}

fn run(mut args: Vec<String>) -> Res<()> {
    let dirs = flag(&mut args, "--dirs", 0)?;
    let size = flag(&mut args, "--size", 512)?;
    let reps = flag(&mut args, "--reps", 1)?;
    let threads = flag(&mut args, "--threads", 2)?;
    let max_load = match args.iter().position(|a| a == "--max-load") {
        Some(i) if i + 1 < args.len() => {
            let v = args.remove(i + 1);
            args.remove(i);
            v.parse::<f64>()
                .map_err(|_| format!("--max-load: not a number: {v}"))?
        }
        Some(_) => return Err("--max-load needs a value".into()),
        None => f64::INFINITY,
    };
    // `cargo bench` passes --bench; anything else starting with -- is unknown.
    args.retain(|a| a != "--bench");
    if let Some(a) = args.iter().find(|a| a.starts_with("--")) {
        return Err(format!("unknown option {a}"));
    }
    let cmd = args.first().cloned().unwrap_or_else(|| "smoke".into());
    let dir = || -> Res<PathBuf> { pos::<PathBuf>(&args, 1, "DIR") };
    let layout = || -> Res<Layout> {
        Ok(Layout {
            n: pos(&args, 2, "N")?,
            dirs,
        })
    };
    let (v, unit) = match cmd.as_str() {
        "create" => (create(&dir()?, layout()?, size)?, "ops/s"),
        "stat" => (stat(&dir()?, layout()?)?, "ops/s"),
        "readdir" => (readdir(&dir()?, reps.max(1))?, "entries/s"),
        "lsl" => (lsl(&dir()?)?, "entries/s"),
        "unlink" => (unlink(&dir()?, layout()?)?, "ops/s"),
        "loop" => (full_loop(&dir()?, layout()?)?, "s"),
        "parallel" => (
            parallel(&dir()?, pos(&args, 2, "T")?, pos(&args, 3, "N")?)?,
            "ops/s",
        ),
        "populate" => (
            populate(&dir()?, pos(&args, 2, "D")?, pos(&args, 3, "F")?, threads)?,
            "s",
        ),
        "walk" => (walk(&dir()?)?, "s"),
        "io" => {
            let what: String = pos(&args, 1, "io kind")?;
            let file: PathBuf = pos(&args, 2, "FILE")?;
            match what.as_str() {
                "seqwrite" => (seqwrite(&file, pos(&args, 3, "MIB")?)?, "MiB/s"),
                "seqread" => (seqread(&file)?, "MiB/s"),
                "randread" => (randio(&file, pos(&args, 3, "SECS")?, false)?, "IOPS"),
                "randwrite" => (randio(&file, pos(&args, 3, "SECS")?, true)?, "IOPS"),
                other => return Err(format!("unknown io kind {other}")),
            }
        }
        "report" => return report(&dir()?, max_load),
        "smoke" => return smoke(),
        other => {
            return Err(format!(
                "unknown command {other} (see the top of benches/meta.rs)"
            ))
        }
    };
    println!("{v:.3} {unit}");
    Ok(())
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meta: {e}");
            ExitCode::FAILURE
        }
    }
}
