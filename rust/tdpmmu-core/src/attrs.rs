//! Per-gfn memory attributes (KVM_SET_MEMORY_ATTRIBUTES): which gfns are private. Kept as a
//! set of disjoint [start, end) ranges so TiB guests cost a few entries, not a bit per page.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct PrivateRanges {
    /// start → end of each private range; ranges never touch or overlap.
    r: BTreeMap<u64, u64>,
}

impl PrivateRanges {
    pub fn is_private(&self, gfn: u64) -> bool {
        self.r
            .range(..=gfn)
            .next_back()
            .is_some_and(|(_, e)| gfn < *e)
    }

    /// Some(value) if every gfn of [start, end) has the same attribute.
    pub fn uniform(&self, start: u64, end: u64) -> Option<bool> {
        if let Some((_, e)) = self.r.range(..=start).next_back()
            && start < *e
        {
            return (end <= *e).then_some(true);
        }
        // No private range covers start: uniform shared iff none starts before end.
        match self.r.range(start..end).next() {
            None => Some(false),
            Some(_) => None,
        }
    }

    pub fn set(&mut self, start: u64, end: u64, private: bool) {
        // Cut [start, end) out of every range, then add it back if private, merging neighbours.
        let mut add = Vec::new();
        let overlapping: Vec<(u64, u64)> = self
            .r
            .range(..end)
            .filter(|(_, e)| **e > start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.r.remove(&s);
            if s < start {
                add.push((s, start));
            }
            if e > end {
                add.push((end, e));
            }
        }
        for (s, e) in add {
            self.r.insert(s, e);
        }
        if private {
            let mut s = start;
            let mut e = end;
            if let Some((ps, pe)) = self.r.range(..s).next_back().map(|(a, b)| (*a, *b))
                && pe == s
            {
                self.r.remove(&ps);
                s = ps;
            }
            if let Some(ne) = self.r.get(&e).copied() {
                self.r.remove(&e);
                e = ne;
            }
            self.r.insert(s, e);
        }
    }

    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.r.iter().map(|(s, e)| (*s, *e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_split_merge() {
        let mut p = PrivateRanges::default();
        p.set(0, 100, true);
        assert!(p.is_private(0) && p.is_private(99) && !p.is_private(100));
        p.set(10, 20, false);
        assert_eq!(p.ranges(), vec![(0, 10), (20, 100)]);
        assert_eq!(p.uniform(0, 10), Some(true));
        assert_eq!(p.uniform(5, 15), None);
        assert_eq!(p.uniform(10, 20), Some(false));
        assert_eq!(p.uniform(100, 200), Some(false));
        p.set(10, 20, true);
        assert_eq!(p.ranges(), vec![(0, 100)]);
        p.set(100, 110, true);
        assert_eq!(p.ranges(), vec![(0, 110)]);
    }
}
