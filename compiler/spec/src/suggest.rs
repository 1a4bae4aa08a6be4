//! "Did you mean …?" suggestions.

/// The candidate closest to `name`, if one is close enough to be a likely typo.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            let d = strsim::damerau_levenshtein(&lower, &c.to_lowercase());
            (d, c)
        })
        .filter(|&(d, c)| d <= (c.chars().count().max(name.chars().count()) / 3).max(1) || d == 0)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}
