//! Symbolic sizes: the extents a dynamic batch or sequence length gives (`docs/dynamic-shapes.md`).
//!
//! A [`SizeExpr`] is a normal form over the graph's symbols: a sum of integer multiples of
//! products of factors, where a factor is a symbol or the floor division of a size by a
//! positive constant (an opaque term, `(batch*seq)//2`). Two sizes are equal exactly when
//! their normal forms are, and that is the only equality shape inference uses: nothing is
//! proved by trying values. A [`Range`] bounds the values a size takes over the symbols'
//! declared bounds.

use serde::Serialize;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A graph symbol's declaration: the bounds every run's value lies in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SymbolDecl {
    pub name: String,
    pub min: i64,
    pub max: i64,
    /// The typical value, at which costs are estimated.
    pub hint: i64,
    /// Every value is a multiple of this (1: any integer).
    pub multiple_of: i64,
}

impl SymbolDecl {
    /// Why the declaration is not a usable symbol, if it is not.
    pub fn check(&self) -> Result<(), String> {
        let n = &self.name;
        if self.min < 1 || self.max < self.min || !(self.min..=self.max).contains(&self.hint) {
            return Err(format!(
                "symbol `{n}` needs 1 <= min <= hint <= max, but has min {}, hint {}, max {}",
                self.min, self.hint, self.max
            ));
        }
        if self.multiple_of < 1 || [self.min, self.hint, self.max].iter().any(|v| v % self.multiple_of != 0) {
            return Err(format!(
                "symbol `{n}` has `multiple_of` {}, which must be positive and divide min, hint and max",
                self.multiple_of
            ));
        }
        Ok(())
    }

    /// Whether `v` is a value the symbol may take.
    pub fn admits(&self, v: i64) -> bool {
        (self.min..=self.max).contains(&v) && v % self.multiple_of == 0
    }
}

/// A symbol as a size reads it: its index in `Graph::symbols`, with its name for printing.
/// Equality and order are by index only.
#[derive(Clone, Debug)]
pub struct Sym {
    pub index: u32,
    pub name: Arc<str>,
}

impl PartialEq for Sym {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
    }
}
impl Eq for Sym {}
impl Hash for Sym {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.index.hash(state)
    }
}
impl PartialOrd for Sym {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Sym {
    fn cmp(&self, other: &Self) -> Ordering {
        self.index.cmp(&other.index)
    }
}

/// One factor of a product: a symbol, or `inner // divisor` (divisor ≥ 2, `inner` reduced so
/// that no part of it divides out).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Factor {
    Sym(Sym),
    FloorDiv(Box<SizeExpr>, i64),
}

/// One factor of a term of [`SizeExpr::terms`]: a symbol, or a size floor-divided by a
/// constant (at least 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermFactor<'a> {
    Sym(&'a Sym),
    FloorDiv(&'a SizeExpr, i64),
}

/// A sorted product of factors; the empty product is 1.
type Monomial = Vec<Factor>;

/// A size in normal form: monomials with their non-zero integer coefficients.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SizeExpr {
    terms: BTreeMap<Monomial, i64>,
}

/// Why a size operation has no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size arithmetic overflows")]
    Overflow,
    #[error("the extent {0} is negative")]
    Negative(i64),
    #[error("`{0}` is divided by {1}: a size is only divided by a positive constant")]
    BadDivisor(String, i64),
    #[error("`{0}` is not provably divisible by {1}")]
    Inexact(String, i64),
}

impl SizeExpr {
    pub fn constant(c: i64) -> SizeExpr {
        let mut terms = BTreeMap::new();
        if c != 0 {
            terms.insert(Vec::new(), c);
        }
        SizeExpr { terms }
    }

    pub fn symbol(index: u32, name: impl Into<Arc<str>>) -> SizeExpr {
        let mut terms = BTreeMap::new();
        terms.insert(vec![Factor::Sym(Sym { index, name: name.into() })], 1);
        SizeExpr { terms }
    }

    /// The value, when it reads no symbol.
    pub fn as_constant(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    /// The symbol, when the size is exactly one symbol.
    pub fn as_symbol(&self) -> Option<&Sym> {
        match self.terms.iter().next() {
            Some((m, 1)) if self.terms.len() == 1 => match m.as_slice() {
                [Factor::Sym(s)] => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    /// The normal form written out, for a consumer that stores it (an artifact's manifest):
    /// each term's coefficient and factors, in the form's order.
    pub fn terms(&self) -> Vec<(i64, Vec<TermFactor<'_>>)> {
        self.terms
            .iter()
            .map(|(m, &c)| {
                let factors = m
                    .iter()
                    .map(|f| match f {
                        Factor::Sym(s) => TermFactor::Sym(s),
                        Factor::FloorDiv(e, k) => TermFactor::FloorDiv(e, *k),
                    })
                    .collect();
                (c, factors)
            })
            .collect()
    }

    /// Every symbol the size reads, each once, by index.
    pub fn symbols(&self) -> Vec<Sym> {
        let mut out = Vec::new();
        self.collect_symbols(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_symbols(&self, out: &mut Vec<Sym>) {
        for m in self.terms.keys() {
            for f in m {
                match f {
                    Factor::Sym(s) => out.push(s.clone()),
                    Factor::FloorDiv(e, _) => e.collect_symbols(out),
                }
            }
        }
    }

    fn add_term(&mut self, m: Monomial, c: i64) -> Result<(), SizeError> {
        let entry = self.terms.entry(m).or_insert(0);
        *entry = entry.checked_add(c).ok_or(SizeError::Overflow)?;
        self.terms.retain(|_, c| *c != 0);
        Ok(())
    }

    pub fn add(&self, other: &SizeExpr) -> Result<SizeExpr, SizeError> {
        let mut out = self.clone();
        for (m, &c) in &other.terms {
            out.add_term(m.clone(), c)?;
        }
        Ok(out)
    }

    pub fn neg(&self) -> Result<SizeExpr, SizeError> {
        self.scale(-1)
    }

    pub fn sub(&self, other: &SizeExpr) -> Result<SizeExpr, SizeError> {
        self.add(&other.neg()?)
    }

    /// `self · k`.
    pub fn scale(&self, k: i64) -> Result<SizeExpr, SizeError> {
        let mut terms = BTreeMap::new();
        if k != 0 {
            for (m, &c) in &self.terms {
                terms.insert(m.clone(), c.checked_mul(k).ok_or(SizeError::Overflow)?);
            }
        }
        Ok(SizeExpr { terms })
    }

    pub fn mul(&self, other: &SizeExpr) -> Result<SizeExpr, SizeError> {
        let mut out = SizeExpr::default();
        for (ma, &ca) in &self.terms {
            for (mb, &cb) in &other.terms {
                let mut m: Monomial = ma.iter().chain(mb).cloned().collect();
                m.sort();
                out.add_term(m, ca.checked_mul(cb).ok_or(SizeError::Overflow)?)?;
            }
        }
        Ok(out)
    }

    /// `self / k` when every coefficient is a multiple of `k` (the normal form proves it).
    pub fn div_exact(&self, k: i64) -> Result<SizeExpr, SizeError> {
        if k <= 0 {
            return Err(SizeError::BadDivisor(self.to_string(), k));
        }
        if self.terms.values().any(|c| c % k != 0) {
            return Err(SizeError::Inexact(self.to_string(), k));
        }
        Ok(SizeExpr { terms: self.terms.iter().map(|(m, c)| (m.clone(), c / k)).collect() })
    }

    /// `⌊self / k⌋`: each term whose coefficient `k` divides comes out of the floor, the
    /// remainders stay inside it as one opaque factor.
    pub fn floor_div(&self, k: i64) -> Result<SizeExpr, SizeError> {
        if k <= 0 {
            return Err(SizeError::BadDivisor(self.to_string(), k));
        }
        if k == 1 {
            return Ok(self.clone());
        }
        let mut outside = SizeExpr::default();
        let mut inside = SizeExpr::default();
        for (m, &c) in &self.terms {
            let (q, r) = (c.div_euclid(k), c.rem_euclid(k));
            if q != 0 {
                outside.add_term(m.clone(), q)?;
            }
            if r != 0 {
                inside.add_term(m.clone(), r)?;
            }
        }
        let floor = match inside.as_constant() {
            // 0 ≤ r < k, so ⌊r / k⌋ = 0.
            Some(_) => SizeExpr::default(),
            None => match inside.single_floor_div() {
                // ⌊⌊e / a⌋ / k⌋ = ⌊e / (a·k)⌋ for positive a and k.
                Some((e, a)) => {
                    let div = a.checked_mul(k).ok_or(SizeError::Overflow)?;
                    let mut terms = BTreeMap::new();
                    terms.insert(vec![Factor::FloorDiv(Box::new(e.clone()), div)], 1);
                    SizeExpr { terms }
                }
                None => {
                    let mut terms = BTreeMap::new();
                    terms.insert(vec![Factor::FloorDiv(Box::new(inside), k)], 1);
                    SizeExpr { terms }
                }
            },
        };
        outside.add(&floor)
    }

    fn single_floor_div(&self) -> Option<(&SizeExpr, i64)> {
        match self.terms.iter().next() {
            Some((m, 1)) if self.terms.len() == 1 => match m.as_slice() {
                [Factor::FloorDiv(e, a)] => Some((e, *a)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value at `values[i]` for symbol `i`; `None` on overflow or a missing symbol.
    pub fn eval(&self, values: &[i64]) -> Option<i64> {
        let mut sum: i64 = 0;
        for (m, &c) in &self.terms {
            let mut p = c;
            for f in m {
                let v = match f {
                    Factor::Sym(s) => *values.get(s.index as usize)?,
                    Factor::FloorDiv(e, k) => e.eval(values)?.div_euclid(*k),
                };
                p = p.checked_mul(v)?;
            }
            sum = sum.checked_add(p)?;
        }
        Some(sum)
    }

    /// Substitutes `values[i]` for symbol `i` where it is `Some`, in normal form.
    pub fn substitute(&self, values: &[Option<i64>]) -> Result<SizeExpr, SizeError> {
        let mut out = SizeExpr::default();
        for (m, &c) in &self.terms {
            let mut p = SizeExpr::constant(c);
            for f in m {
                let x = match f {
                    Factor::Sym(s) => match values.get(s.index as usize).copied().flatten() {
                        Some(v) => SizeExpr::constant(v),
                        None => SizeExpr { terms: BTreeMap::from([(vec![f.clone()], 1)]) },
                    },
                    Factor::FloorDiv(e, k) => e.substitute(values)?.floor_div(*k)?,
                };
                p = p.mul(&x)?;
            }
            out = out.add(&p)?;
        }
        Ok(out)
    }

    /// The values the size takes over the symbols' bounds (`symbols[i]` declares symbol `i`;
    /// a symbol past the end counts as unbounded). Interval arithmetic: it never misses a
    /// value, and may include some no binding gives.
    pub fn range(&self, symbols: &[SymbolDecl]) -> Range {
        let mut total = Range::exactly(0);
        for (m, &c) in &self.terms {
            let mut p = Range::exactly(c);
            for f in m {
                let r = match f {
                    Factor::Sym(s) => match symbols.get(s.index as usize) {
                        Some(d) => Range { min: d.min, max: d.max, multiple: d.multiple_of },
                        None => Range::UNBOUNDED,
                    },
                    Factor::FloorDiv(e, k) => e.range(symbols).floor_div(*k),
                };
                p = p.mul(&r);
            }
            total = total.add(&p);
        }
        total
    }
}

/// The integers from `min` to `max` that are multiples of `multiple` (0: only 0). Bounds
/// saturate at the ends of `i64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub min: i64,
    pub max: i64,
    pub multiple: i64,
}

impl Range {
    const UNBOUNDED: Range = Range { min: i64::MIN, max: i64::MAX, multiple: 1 };

    pub fn exactly(v: i64) -> Range {
        Range { min: v, max: v, multiple: v.checked_abs().unwrap_or(1) }
    }

    pub fn contains(&self, v: i64) -> bool {
        (self.min..=self.max).contains(&v)
            && match self.multiple {
                0 => v == 0,
                m => v % m == 0,
            }
    }

    fn add(&self, o: &Range) -> Range {
        Range {
            min: self.min.saturating_add(o.min),
            max: self.max.saturating_add(o.max),
            multiple: gcd(self.multiple, o.multiple),
        }
    }

    fn mul(&self, o: &Range) -> Range {
        let c = [(self.min, o.min), (self.min, o.max), (self.max, o.min), (self.max, o.max)]
            .map(|(a, b)| a.saturating_mul(b));
        let (min, max) = (c.iter().copied().min().unwrap_or(0), c.iter().copied().max().unwrap_or(0));
        Range { min, max, multiple: self.multiple.checked_mul(o.multiple).unwrap_or(1) }
    }

    fn floor_div(&self, k: i64) -> Range {
        let multiple = if self.multiple % k == 0 { self.multiple / k } else { 1 };
        Range { min: self.min.div_euclid(k), max: self.max.div_euclid(k), multiple }
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    let (mut a, mut b) = (a.unsigned_abs(), b.unsigned_abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    i64::try_from(a).unwrap_or(1)
}

impl fmt::Display for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Factor::Sym(s) => f.write_str(&s.name),
            Factor::FloorDiv(e, k) if e.as_symbol().is_some() => write!(f, "{e}//{k}"),
            Factor::FloorDiv(e, k) => write!(f, "({e})//{k}"),
        }
    }
}

/// Prints by symbol names: `batch*seq`, `2*seq - 1`, `(batch*seq + 1)//2`; a floor division
/// multiplied by anything is parenthesized.
impl fmt::Display for SizeExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Constant last: `seq + 1`, not `1 + seq`.
        let ordered =
            self.terms.iter().filter(|(m, _)| !m.is_empty()).chain(self.terms.get_key_value(&Vec::new()));
        for (i, (m, &c)) in ordered.enumerate() {
            let mag = c.unsigned_abs();
            match (i, c < 0) {
                (0, true) => f.write_str("-")?,
                (0, false) => {}
                (_, true) => f.write_str(" - ")?,
                (_, false) => f.write_str(" + ")?,
            }
            if m.is_empty() {
                write!(f, "{mag}")?;
                continue;
            }
            let alone = mag == 1 && m.len() == 1;
            let factors: Vec<String> = m
                .iter()
                .map(|x| match x {
                    Factor::FloorDiv(..) if !alone => format!("({x})"),
                    _ => x.to_string(),
                })
                .collect();
            if mag != 1 {
                write!(f, "{mag}*")?;
            }
            f.write_str(&factors.join("*"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(i: u32) -> SizeExpr {
        SizeExpr::symbol(i, ["batch", "seq", "heads"][i as usize])
    }

    fn c(v: i64) -> SizeExpr {
        SizeExpr::constant(v)
    }

    #[test]
    fn normal_forms_print_by_name() {
        let (b, q) = (s(0), s(1));
        let bq = b.mul(&q).unwrap();
        assert_eq!(bq.to_string(), "batch*seq");
        assert_eq!(q.mul(&b).unwrap(), bq);
        assert_eq!(q.scale(2).unwrap().sub(&c(1)).unwrap().to_string(), "2*seq - 1");
        assert_eq!(c(1).sub(&q).unwrap().to_string(), "-seq + 1");
        assert_eq!(bq.floor_div(2).unwrap().to_string(), "(batch*seq)//2");
        assert_eq!(q.floor_div(8).unwrap().scale(3).unwrap().to_string(), "3*(seq//8)");
        assert_eq!(q.sub(&q).unwrap().to_string(), "0");
        assert_eq!(q.scale(4).unwrap().add(&c(3)).unwrap().floor_div(2).unwrap().to_string(), "2*seq + 1");
        assert_eq!(q.scale(3).unwrap().floor_div(2).unwrap().to_string(), "seq + seq//2");
        assert_eq!(q.floor_div(2).unwrap().floor_div(4).unwrap(), q.floor_div(8).unwrap());
        assert_eq!(q.scale(6).unwrap().div_exact(3).unwrap().to_string(), "2*seq");
        assert_eq!(q.div_exact(3), Err(SizeError::Inexact("seq".into(), 3)));
        assert_eq!(q.floor_div(0), Err(SizeError::BadDivisor("seq".into(), 0)));
    }

    #[test]
    fn substitution_collapses_to_constants() {
        let e = s(0).mul(&s(1)).unwrap().add(&c(1)).unwrap().floor_div(2).unwrap();
        assert_eq!(e.substitute(&[Some(3), Some(5)]).unwrap(), c(8));
        assert_eq!(e.substitute(&[Some(2), None]).unwrap().to_string(), "seq");
        assert_eq!(e.eval(&[3, 5]), Some(8));
    }

    /// A size as written, evaluated directly, to check the normal form against.
    #[derive(Clone, Debug)]
    enum Tree {
        Const(i64),
        Sym(u32),
        Add(Box<Tree>, Box<Tree>),
        Sub(Box<Tree>, Box<Tree>),
        Mul(Box<Tree>, Box<Tree>),
        FloorDiv(Box<Tree>, i64),
    }

    impl Tree {
        fn direct(&self, v: &[i64]) -> i64 {
            match self {
                Tree::Const(c) => *c,
                Tree::Sym(i) => v[*i as usize],
                Tree::Add(a, b) => a.direct(v) + b.direct(v),
                Tree::Sub(a, b) => a.direct(v) - b.direct(v),
                Tree::Mul(a, b) => a.direct(v) * b.direct(v),
                Tree::FloorDiv(a, k) => a.direct(v).div_euclid(*k),
            }
        }

        fn normal(&self) -> SizeExpr {
            match self {
                Tree::Const(x) => c(*x),
                Tree::Sym(i) => s(*i),
                Tree::Add(a, b) => a.normal().add(&b.normal()).unwrap(),
                Tree::Sub(a, b) => a.normal().sub(&b.normal()).unwrap(),
                Tree::Mul(a, b) => a.normal().mul(&b.normal()).unwrap(),
                Tree::FloorDiv(a, k) => a.normal().floor_div(*k).unwrap(),
            }
        }
    }

    fn tree() -> impl Strategy<Value = Tree> {
        let leaf = prop_oneof![(-4i64..8).prop_map(Tree::Const), (0u32..3).prop_map(Tree::Sym)];
        leaf.prop_recursive(4, 24, 2, |t| {
            prop_oneof![
                (t.clone(), t.clone()).prop_map(|(a, b)| Tree::Add(Box::new(a), Box::new(b))),
                (t.clone(), t.clone()).prop_map(|(a, b)| Tree::Sub(Box::new(a), Box::new(b))),
                (t.clone(), t.clone()).prop_map(|(a, b)| Tree::Mul(Box::new(a), Box::new(b))),
                (t, 1i64..6).prop_map(|(a, k)| Tree::FloorDiv(Box::new(a), k)),
            ]
        })
    }

    const DECLS: [(i64, i64, i64); 3] = [(1, 16, 1), (8, 64, 8), (2, 6, 2)];

    fn decls() -> Vec<SymbolDecl> {
        DECLS
            .iter()
            .zip(["batch", "seq", "heads"])
            .map(|(&(min, max, multiple_of), name)| SymbolDecl {
                name: name.into(),
                min,
                max,
                hint: min,
                multiple_of,
            })
            .collect()
    }

    /// A binding inside the declared bounds.
    fn binding() -> impl Strategy<Value = Vec<i64>> {
        DECLS.map(|(min, max, m)| (min / m..=max / m).prop_map(move |x| x * m)).to_vec()
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn normal_form_evaluates_like_the_written_size(t in tree(), v in binding()) {
            prop_assert_eq!(t.normal().eval(&v), Some(t.direct(&v)));
        }

        #[test]
        fn equal_normal_forms_evaluate_equal(a in tree(), b in tree(), v in binding()) {
            if a.normal() == b.normal() {
                prop_assert_eq!(a.direct(&v), b.direct(&v));
            }
            // Rewrites that must keep the normal form.
            let sum = |x: &Tree, y: &Tree| Tree::Add(Box::new(x.clone()), Box::new(y.clone()));
            let prod = |x: &Tree, y: &Tree| Tree::Mul(Box::new(x.clone()), Box::new(y.clone()));
            prop_assert_eq!(sum(&a, &b).normal(), sum(&b, &a).normal());
            prop_assert_eq!(prod(&a, &b).normal(), prod(&b, &a).normal());
            let k = Tree::Const(3);
            prop_assert_eq!(prod(&k, &sum(&a, &b)).normal(), sum(&prod(&k, &a), &prod(&k, &b)).normal());
            let shifted = Tree::FloorDiv(Box::new(sum(&prod(&a, &Tree::Const(4)), &b)), 4);
            prop_assert_eq!(shifted.normal(), sum(&a, &Tree::FloorDiv(Box::new(b.clone()), 4)).normal());
        }

        #[test]
        fn values_lie_inside_the_range(t in tree(), v in binding()) {
            let r = t.normal().range(&decls());
            prop_assert!(r.contains(t.direct(&v)), "{} = {} outside {:?}", t.normal(), t.direct(&v), r);
        }

        #[test]
        fn substitution_agrees_with_evaluation(t in tree(), v in binding()) {
            let all: Vec<Option<i64>> = v.iter().map(|&x| Some(x)).collect();
            prop_assert_eq!(t.normal().substitute(&all).unwrap().as_constant(), Some(t.direct(&v)));
            let part = [Some(v[0]), None, Some(v[2])];
            prop_assert_eq!(t.normal().substitute(&part).unwrap().eval(&v), Some(t.direct(&v)));
        }
    }
}
