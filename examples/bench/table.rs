//! Collects medians and prints them with their ratios to the limit and the best peer.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Procexec,
    /// Another process-parallel library.
    Peer,
    /// An in-process bound (threads): no process boundary to cross.
    InProcess,
    /// What the pipes allow.
    Limit,
}

struct Row {
    kind: Kind,
    label: String,
    median: f64,
    /// Spread of the samples: (25th, 75th percentile).
    quartiles: (f64, f64),
}

struct Workload {
    id: &'static str,
    name: String,
    unit: &'static str,
    better: Better,
    rows: Vec<Row>,
}

#[derive(Default)]
pub struct Table {
    workloads: Vec<Workload>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

impl Table {
    pub fn workload(&mut self, id: &'static str, name: &str, unit: &'static str, better: Better) {
        self.workloads.push(Workload { id, name: name.into(), unit, better, rows: Vec::new() });
    }

    /// Adds a row to the current workload and prints it at once (runs are long).
    pub fn row(&mut self, kind: Kind, label: &str, mut samples: Vec<f64>) {
        samples.sort_by(f64::total_cmp);
        let median = quantile(&samples, 0.5);
        let quartiles = (quantile(&samples, 0.25), quantile(&samples, 0.75));
        let workload = self.workloads.last_mut().expect("a workload first");
        eprintln!("  {:<10} {:<56} {:>12.3} {}", workload.id, label, median, workload.unit);
        workload.rows.push(Row { kind, label: label.into(), median, quartiles });
    }

    /// The median of the first row of `workload` whose label starts with `prefix`.
    pub fn value(&self, workload: &str, prefix: &str) -> Option<f64> {
        let workload = self.workloads.iter().find(|w| w.id == workload)?;
        workload.rows.iter().find(|row| row.label.starts_with(prefix)).map(|row| row.median)
    }

    pub fn print(&self) {
        for workload in self.workloads.iter().filter(|w| !w.rows.is_empty()) {
            let direction =
                if workload.better == Better::Lower { "lower is better" } else { "higher is better" };
            println!("\n{} ({}, {})", workload.name, workload.unit, direction);
            println!(
                "  {:<56} {:>11} {:>19} {:>9} {:>16}",
                "implementation", "median", "quartiles", "x limit", "procexec vs best"
            );
            let limit = workload.rows.iter().find(|row| row.kind == Kind::Limit).map(|row| row.median);
            let best_peer = workload
                .rows
                .iter()
                .filter(|row| row.kind == Kind::Peer)
                .map(|row| row.median)
                .reduce(|a, b| if (workload.better == Better::Lower) == (a < b) { a } else { b });
            for row in &workload.rows {
                let of_limit = match limit {
                    Some(limit) if row.kind != Kind::Limit => format!("{:.2}", row.median / limit),
                    _ => String::new(),
                };
                let versus = match (row.kind, best_peer) {
                    (Kind::Procexec, Some(best)) => {
                        let ratio = if workload.better == Better::Lower {
                            best / row.median
                        } else {
                            row.median / best
                        };
                        format!("{ratio:.2}x better")
                    }
                    _ => String::new(),
                };
                let quartiles = format!("{:.3}..{:.3}", row.quartiles.0, row.quartiles.1);
                println!(
                    "  {:<56} {:>11.3} {:>19} {:>9} {:>16}",
                    row.label, row.median, quartiles, of_limit, versus
                );
            }
        }
        self.print_targets();
    }

    fn print_targets(&self) {
        println!("\nTargets (ratios within this run):");
        let check = |what: &str, measured: Option<f64>, target: f64, higher_is_better: bool| {
            let Some(measured) = measured else {
                return;
            };
            let met = if higher_is_better { measured >= target } else { measured <= target };
            let sign = if higher_is_better { ">=" } else { "<=" };
            println!(
                "  {:<72} {:>8.3} (target {sign} {target}) {}",
                what,
                measured,
                if met { "met" } else { "MISSED" }
            );
        };
        let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
        let python_best = self.value("W1", "Python Pool.map (default");
        for flavor in ["multi-thread", "current-thread"] {
            let map = self.value("W1", &format!("(a) procexec map, {flavor}"));
            check(
                &format!("W1(a) map, {flavor}: times faster than Python Pool.map"),
                ratio(python_best, map),
                2.0,
                true,
            );
        }
        for flavor in ["multi-thread", "current-thread"] {
            let spawn = self.value("W1", &format!("(b) procexec spawn each, {flavor}"));
            check(&format!("W1(b) spawn each, {flavor}: µs per task"), spawn, 1.0, false);
        }
        for flavor in ["multi-thread", "current-thread"] {
            let spawn = self.value("W1", &format!("(b) procexec spawn each, {flavor}"));
            let python = self.value("W1", "Python Pool.map (chunksize=1)");
            check(
                &format!("W1(b) spawn each, {flavor}: times faster than Python chunksize=1"),
                ratio(python, spawn),
                14.0,
                true,
            );
            let procspawn = self.value("W1", "procspawn");
            check(
                &format!("W1(b) spawn each, {flavor}: times faster than procspawn"),
                ratio(procspawn, spawn),
                35.0,
                true,
            );
        }
        check("W2 map: parallel efficiency", self.value("W2", "procexec map"), 0.98, true);
        let w3 = self.value("W3", "procexec");
        check("W3: fraction of the raw-pipe limit", ratio(w3, self.value("W3", "raw pipes")), 0.6, true);
        let python_w3 = ["Python Pool.map", "Python Pool.imap"]
            .iter()
            .filter_map(|p| self.value("W3", p))
            .reduce(f64::max);
        check("W3: times Python's best", ratio(w3, python_w3), 2.0, true);
        let start = self.value("W4", "procexec build");
        check(
            "W4: start-up / bare spawn of 2 children",
            ratio(start, self.value("W4", "bare spawn")),
            1.5,
            false,
        );
        check(
            "W4: times faster than Python's fork pool",
            ratio(self.value("W4", "Python Pool(2) fork: start"), start),
            3.0,
            true,
        );
        check(
            "W6 many calls: 100,000 spawns + join_all / 10,000 (total time)",
            ratio(self.value("W6", "procexec 100,000"), self.value("W6", "procexec 10,000")),
            12.0,
            false,
        );
        check(
            "W10a: map with a filtered-out debug! per item / without",
            ratio(self.value("W10a", "procexec map, debug!"), self.value("W10a", "procexec map, no event")),
            1.05,
            false,
        );
        check(
            "W9a: lock pairs, times Python's Value.get_lock()",
            ratio(self.value("W9a", "procexec"), self.value("W9a", "Python")),
            10.0,
            true,
        );
        check(
            "W9c: 256 MiB read, times faster shared than sent",
            ratio(self.value("W9c", "procexec Blob"), self.value("W9c", "procexec SharedBytes")),
            5.0,
            true,
        );
        let two = self.value("W11d", "procexec map, 2 workers");
        check(
            "W11 tiny map: 256 workers / 2 workers (µs per task)",
            ratio(self.value("W11d", "procexec map, 256 workers"), two),
            1.3,
            false,
        );
        let two = self.value("W11e", "procexec spawn each, 2 workers");
        check(
            "W11 10k spawns: 256 workers / 2 workers (µs per call)",
            ratio(self.value("W11e", "procexec spawn each, 256 workers"), two),
            1.3,
            false,
        );
        check(
            "W12 60 MiB Blob echo: MB/s both ways",
            self.value("W12", "procexec echo 60 MiB, Blob"),
            2000.0,
            true,
        );
        for side in ["parent", "worker"] {
            let peak = self.value("W12m", &format!("procexec echo 60 MiB, Blob: {side}"));
            check(&format!("W12 60 MiB Blob echo: peak added in the {side} (x payload)"), peak, 1.5, false);
        }
        for (id, placement) in [("W5", "across CPUs"), ("W5s", "same CPU")] {
            for flavor in ["multi-thread", "current-thread"] {
                let rtt = self.value(id, &format!("procexec spawn().await, {flavor}"));
                let what = format!("W5 {placement}, {flavor}: round trip / raw ping-pong");
                check(&what, ratio(rtt, self.value(id, "raw pipes")), 1.25, false);
            }
        }
    }
}
