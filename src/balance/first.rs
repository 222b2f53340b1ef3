//! First: the lowest-index eligible server, in list order. With per-server connection
//! limits this fills servers one after the other (HAProxy's `first`), so spare servers can
//! be idle or powered down; without limits the first server takes everything.

use super::Servers;

#[derive(Debug)]
pub struct First {
    len: usize,
}

impl First {
    pub fn new(len: usize) -> First {
        First { len }
    }

    /// The first eligible server in list order; `None` when none is eligible.
    #[inline]
    pub fn pick(&self, servers: &impl Servers) -> Option<usize> {
        (0..self.len).find(|&i| servers.eligible(i))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Fake;
    use super::*;

    #[test]
    fn picks_lowest_eligible() {
        let f = First::new(4);
        let mut servers = Fake::with_active(&[9, 0, 0, 0]);
        assert_eq!(f.pick(&servers), Some(0));
        servers.eligible[0] = false;
        assert_eq!(f.pick(&servers), Some(1));
        servers.eligible[1] = false;
        servers.eligible[2] = false;
        assert_eq!(f.pick(&servers), Some(3));
        servers.eligible[3] = false;
        assert_eq!(f.pick(&servers), None);
    }
}
