//! `Profile`: where a run's time goes, step by step, with the throughput each step achieved, so
//! the slow kernels of a compiled model are visible without an external profiler.

use std::fmt;
use std::time::Duration;

/// The timing of every step of a model, median over the repeats of `Model::run_profiled`.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// One entry per step, in execution order.
    pub steps: Vec<StepProfile>,
    /// Median wall time of a whole run (inputs checked, every step, outputs copied).
    pub total: Duration,
    /// Size of the model's arena.
    pub arena_bytes: u64,
    /// Threads the model runs on.
    pub threads: usize,
    /// How many runs the medians are taken over.
    pub repeats: usize,
}

/// The timing of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProfile {
    /// The step's label from the manifest.
    pub label: String,
    /// Median time of the step.
    pub time: Duration,
    /// Fraction of the summed step times, in `[0, 1]`.
    pub share: f64,
    /// Estimated floating-point operations of the step (over run-time sizes, the manifest's
    /// estimate at the hints scaled by the step's range at the run's sizes).
    pub flops: u64,
    /// Estimated bytes moved by the step (scaled as `flops`).
    pub bytes: u64,
}

impl StepProfile {
    /// Achieved GFLOP/s: the step's estimated flops over its time.
    pub fn gflops(&self) -> f64 {
        per_second(self.flops, self.time) / 1e9
    }

    /// Achieved GB/s: the step's estimated bytes over its time.
    pub fn gbytes_per_s(&self) -> f64 {
        per_second(self.bytes, self.time) / 1e9
    }
}

/// The steps of one kind of kernel (`matmul_epilogue`, `attention`, …) taken together.
#[derive(Debug, Clone, PartialEq)]
pub struct KindProfile {
    /// The kind, as [`StepProfile::kind`] reads it from the labels.
    pub kind: String,
    /// How many steps are of this kind.
    pub steps: usize,
    /// Their summed median times.
    pub time: Duration,
    /// Their fraction of the summed step times, in `[0, 1]`.
    pub share: f64,
    /// Their estimated floating-point operations.
    pub flops: u64,
    /// Their estimated bytes moved.
    pub bytes: u64,
}

impl StepProfile {
    /// The kernel kind in a step label `kN KIND[(detail)] [shape]`: the word after the step
    /// number, without its parenthesized detail (the whole label when it has no such word).
    pub fn kind(&self) -> &str {
        let mut words = self.label.split_whitespace();
        let word = match (words.next(), words.next()) {
            (Some(_), Some(w)) if !w.starts_with('[') => w,
            _ => self.label.as_str(),
        };
        word.split('(').next().unwrap_or(word)
    }
}

impl Profile {
    /// The steps grouped by kernel kind, slowest kind first: which family of kernels the time
    /// goes to, however many steps it is spread over.
    pub fn by_kind(&self) -> Vec<KindProfile> {
        let mut kinds: Vec<KindProfile> = Vec::new();
        for s in &self.steps {
            let i = match kinds.iter().position(|k| k.kind == s.kind()) {
                Some(i) => i,
                None => {
                    let k = s.kind().to_string();
                    kinds.push(KindProfile {
                        kind: k,
                        steps: 0,
                        time: Duration::ZERO,
                        share: 0.0,
                        flops: 0,
                        bytes: 0,
                    });
                    kinds.len() - 1
                }
            };
            let k = &mut kinds[i];
            k.steps += 1;
            k.time += s.time;
            k.share += s.share;
            k.flops += s.flops;
            k.bytes += s.bytes;
        }
        kinds.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.kind.cmp(&b.kind)));
        kinds
    }

    /// Builds the profile from per-run step times (`times[run][step]`) and whole-run times.
    pub(crate) fn from_times(
        labels: impl Iterator<Item = (String, u64, u64)>,
        step_times: &[Vec<Duration>],
        run_times: Vec<Duration>,
        arena_bytes: u64,
        threads: usize,
    ) -> Profile {
        let medians: Vec<Duration> = (0..step_times.first().map_or(0, Vec::len))
            .map(|s| median(step_times.iter().map(|run| run[s]).collect()))
            .collect();
        let sum: f64 = medians.iter().map(Duration::as_secs_f64).sum();
        let steps = labels
            .zip(&medians)
            .map(|((label, flops, bytes), &time)| StepProfile {
                label,
                time,
                share: if sum > 0.0 { time.as_secs_f64() / sum } else { 0.0 },
                flops,
                bytes,
            })
            .collect();
        let repeats = run_times.len();
        Profile { steps, total: median(run_times), arena_bytes, threads, repeats }
    }
}

/// How many steps the table shows; the rest are summed in one line.
const TOP: usize = 20;
const TOTAL: &str = "total (steps)";

impl fmt::Display for Profile {
    /// A table sorted by time, slowest first: the top steps, a line for the rest, and totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut order: Vec<&StepProfile> = self.steps.iter().collect();
        order.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.label.cmp(&b.label)));
        let shown = &order[..order.len().min(TOP)];
        let rest = &order[shown.len()..];
        let rest_label = format!("({} more steps)", rest.len());
        let width = shown
            .iter()
            .map(|s| s.label.chars().count())
            .chain([TOTAL.len(), if rest.is_empty() { 0 } else { rest_label.len() }])
            .max()
            .unwrap_or(0);
        writeln!(
            f,
            "profile: {} steps, {} threads, arena {}, median of {} runs",
            self.steps.len(),
            self.threads,
            human_bytes(self.arena_bytes),
            self.repeats
        )?;
        writeln!(f, "{:<width$}  {:>10}  {:>6}  {:>9}  {:>8}", "step", "time", "share", "GFLOP/s", "GB/s")?;
        for step in shown {
            writeln!(
                f,
                "{:<width$}  {:>10}  {:>5.1}%  {:>9.2}  {:>8.2}",
                step.label,
                human_time(step.time),
                step.share * 100.0,
                step.gflops(),
                step.gbytes_per_s()
            )?;
        }
        if !rest.is_empty() {
            let time: Duration = rest.iter().map(|s| s.time).sum();
            let share: f64 = rest.iter().map(|s| s.share).sum();
            writeln!(f, "{rest_label:<width$}  {:>10}  {:>5.1}%", human_time(time), share * 100.0)?;
        }
        let steps: Duration = self.steps.iter().map(|s| s.time).sum();
        let flops: u64 = self.steps.iter().map(|s| s.flops).sum();
        let bytes: u64 = self.steps.iter().map(|s| s.bytes).sum();
        write!(
            f,
            "{:<width$}  {:>10}  {:>5.1}%  {:>9.2}  {:>8.2}   (whole run {})",
            TOTAL,
            human_time(steps),
            if self.steps.is_empty() { 0.0 } else { 100.0 },
            per_second(flops, steps) / 1e9,
            per_second(bytes, steps) / 1e9,
            human_time(self.total)
        )?;
        let kinds = self.by_kind();
        let width = kinds.iter().map(|k| k.kind.chars().count()).chain(["by kind".len()]).max().unwrap_or(0);
        write!(
            f,
            "\n\n{:<width$}  {:>5}  {:>10}  {:>6}  {:>9}  {:>8}",
            "by kind", "steps", "time", "share", "GFLOP/s", "GB/s"
        )?;
        for k in &kinds {
            write!(
                f,
                "\n{:<width$}  {:>5}  {:>10}  {:>5.1}%  {:>9.2}  {:>8.2}",
                k.kind,
                k.steps,
                human_time(k.time),
                k.share * 100.0,
                per_second(k.flops, k.time) / 1e9,
                per_second(k.bytes, k.time) / 1e9
            )?;
        }
        Ok(())
    }
}

fn per_second(amount: u64, time: Duration) -> f64 {
    let secs = time.as_secs_f64();
    if secs > 0.0 {
        amount as f64 / secs
    } else {
        0.0
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    if times.is_empty() {
        return Duration::ZERO;
    }
    times.sort_unstable();
    let mid = times.len() / 2;
    if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2
    }
}

fn human_time(t: Duration) -> String {
    let us = t.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.3} s", us / 1e6)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn medians_shares_and_rates() {
        let labels = vec![("a".to_string(), 2_000_000, 1_000), ("bb".to_string(), 0, 4_000_000)];
        let times = vec![vec![us(10), us(40)], vec![us(30), us(20)], vec![us(20), us(30)]];
        let p = Profile::from_times(labels.into_iter(), &times, vec![us(60), us(50), us(55)], 4096, 2);
        assert_eq!(p.steps[0].time, us(20));
        assert_eq!(p.steps[1].time, us(30));
        assert!((p.steps[0].share - 0.4).abs() < 1e-9);
        assert!((p.steps[0].gflops() - 100.0).abs() < 1e-6);
        assert!((p.steps[1].gbytes_per_s() - 133.333).abs() < 1e-2);
        assert_eq!(p.total, us(55));
        assert_eq!(median(vec![us(1), us(3)]), us(2));

        let text = p.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 9, "{text}");
        assert!(lines[0].contains("2 steps, 2 threads, arena 4.0 KiB, median of 3 runs"), "{text}");
        assert!(lines[2].starts_with("bb ") && lines[3].starts_with("a "), "slowest first:\n{text}");
        assert!(lines[4].starts_with("total (steps)"), "{text}");
        // Columns line up: every row puts its time column at the same place.
        let col = lines[1].find("time").unwrap() + "time".len() - 1;
        assert!(lines[2..5].iter().all(|l| l.chars().nth(col) == Some('s')), "{text}");
        assert_eq!(lines[5], "", "{text}");
        assert!(
            lines[6].starts_with("by kind") && lines[7].starts_with("bb ") && lines[8].starts_with("a "),
            "{text}"
        );
    }

    #[test]
    fn kinds_group_steps() {
        let labels = [
            "k0 matmul_epilogue(gelu) [1, 128, 1536]",
            "k1 attention [1, 12, 128, 32]",
            "k2 matmul_epilogue [1, 128, 384]",
            "k3 [2, 2]",
        ]
        .map(|l| (l.to_string(), 1_000_000, 0));
        let times = vec![vec![us(30), us(20), us(40), us(10)]];
        let p = Profile::from_times(labels.into_iter(), &times, vec![us(100)], 0, 1);
        let kinds = p.by_kind();
        let names: Vec<&str> = kinds.iter().map(|k| k.kind.as_str()).collect();
        assert_eq!(names, ["matmul_epilogue", "attention", "k3 [2, 2]"]);
        assert_eq!((kinds[0].steps, kinds[0].time, kinds[0].flops), (2, us(70), 2_000_000));
        assert!((kinds[0].share - 0.7).abs() < 1e-9);
        assert!(p.to_string().contains("\nmatmul_epilogue      2     70.0 µs   70.0%"), "{p}");
    }

    #[test]
    fn long_profiles_are_cut() {
        let labels = (0..25).map(|i| (format!("k{i}"), 0, 0));
        let times = vec![(0..25).map(us).collect::<Vec<_>>()];
        let text = Profile::from_times(labels, &times, vec![us(300)], 0, 1).to_string();
        assert!(text.contains("(5 more steps)"), "{text}");
        assert_eq!(text.lines().count(), 2 + 20 + 2 + 2 + 25);
        assert!(text.lines().nth(2).unwrap().starts_with("k24"));
    }
}
