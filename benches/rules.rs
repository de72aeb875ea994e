//! `Rules::resolve` runs on every FUSE lookup and create: measure it at 10,
//! 100 and 1000 rules mixing literal, `*` and `**` patterns.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use labfs::rules::{Class, Rule, Rules, Unplaced};

const PATHS: &[&str] = &[
    "/",
    "/cache/thumbs/ab/cd/0001.jpg",
    "/svc3/db/wal/000000010000000000000001",
    "/projects/p1/data/run-17/out.csv",
    "/scans/2024-05-01/work7/img_0001.tif",
    "/scans/2024-05-01/raw/img_0001.tif",
    "/home/alice/app8/cache/blob",
    "/home/bob/.cache/pip/wheels/x.whl",
    "/media/movies/2020/tag9/film.mkv",
    "/media/music/artist/album/track01.flac",
    "/nomatch/deep/a/b/c/d/e/f/g",
];

fn generated_rules(n: usize) -> Rules {
    let fixed = ["/cache", "/media", "/**/.cache"];
    let rules = fixed
        .iter()
        .map(|p| p.to_string())
        .chain((fixed.len()..n).map(|i| match i % 5 {
            0 => format!("/svc{i}"),
            1 => format!("/projects/p{i}/data"),
            2 => format!("/scans/*/work{i}"),
            3 => format!("/home/*/app{i}/cache"),
            _ => format!("/media/**/tag{i}"),
        }))
        .take(n)
        .enumerate()
        .map(|(i, path)| Rule {
            path,
            class: Class::ALL[i % Class::ALL.len()],
            read_only: false,
            writers: Vec::new(),
            promote_class: None,
            max_unpromoted: None,
            line: i + 1,
        })
        .collect();
    Rules::new(rules, Unplaced::Authoritative)
}

fn bench_resolve(c: &mut Criterion) {
    let mut group = c.benchmark_group("resolve");
    for n in [10, 100, 1000] {
        let rules = generated_rules(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &rules, |b, rules| {
            b.iter(|| {
                for path in PATHS {
                    black_box(rules.resolve(black_box(path)));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_resolve);
criterion_main!(benches);
