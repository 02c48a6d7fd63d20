//! The host the simulated vCPUs run on: sockets, cores, SMT threads and memory bandwidth, and
//! the cost of moving a cache line between two CPUs of it.

use crate::cost::CostModel;
use crate::error::{Error, Result};

/// A host machine. vCPU `i` is pinned to CPU `i`; CPUs are numbered as Linux numbers them on
/// x86 servers: first one thread of every core, socket by socket, then the SMT siblings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Machine {
    pub sockets: u32,
    pub cores_per_socket: u32,
    pub threads_per_core: u32,
    /// Memory write bandwidth of one socket for page zeroing and copying, GB/s (= bytes/ns).
    pub mem_bw_gbps: f64,
}

impl Default for Machine {
    /// A two-socket server with 64 cores per socket and SMT (256 CPUs), 150 GB/s per socket
    /// (docs/costs.md: half of 8 channels of DDR5-4800, an estimate).
    fn default() -> Self {
        Self {
            sockets: 2,
            cores_per_socket: 64,
            threads_per_core: 2,
            mem_bw_gbps: 150.0,
        }
    }
}

/// Where a CPU sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub socket: u32,
    pub core: u32,
}

impl Machine {
    pub fn cpus(&self) -> u32 {
        self.sockets * self.cores_per_socket * self.threads_per_core
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, what: String| Err(Error::Config(format!("machine.{name}: {what}")));
        if !(1..=64).contains(&self.sockets) {
            return bad(
                "sockets",
                format!("must be in 1..=64, got {}", self.sockets),
            );
        }
        if !(1..=1024).contains(&self.cores_per_socket) {
            return bad(
                "cores_per_socket",
                format!("must be in 1..=1024, got {}", self.cores_per_socket),
            );
        }
        if !(1..=8).contains(&self.threads_per_core) {
            return bad(
                "threads_per_core",
                format!("must be in 1..=8, got {}", self.threads_per_core),
            );
        }
        if !(self.mem_bw_gbps.is_finite() && self.mem_bw_gbps > 0.0) {
            return bad(
                "mem_bw_gbps",
                format!("must be a finite number > 0, got {}", self.mem_bw_gbps),
            );
        }
        Ok(())
    }

    /// The socket and physical core of CPU `cpu` (wrapping past the last CPU).
    pub fn place(&self, cpu: u32) -> Place {
        let phys = self.sockets * self.cores_per_socket;
        let c = cpu % self.cpus() % phys;
        Place {
            socket: c / self.cores_per_socket,
            core: c,
        }
    }

    /// Modeled time to move a cache line last written by `from` to `to` (`from` = None: the
    /// line is in no CPU's cache yet and costs a local access).
    pub fn line_ns(&self, costs: &CostModel, from: Option<u32>, to: u32) -> f64 {
        let Some(from) = from else {
            return costs.line_local_ns;
        };
        if from == to {
            return costs.line_local_ns;
        }
        let (a, b) = (self.place(from), self.place(to));
        if a.core == b.core {
            costs.line_smt_ns
        } else if a.socket == b.socket {
            costs.line_socket_ns
        } else {
            costs.line_remote_ns
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_and_distances() {
        let m = Machine::default();
        let c = CostModel::default();
        assert_eq!(m.cpus(), 256);
        assert_eq!(m.place(0).socket, 0);
        assert_eq!(m.place(64).socket, 1);
        // CPU 128 is CPU 0's SMT sibling.
        assert_eq!(m.place(128).core, m.place(0).core);
        assert_eq!(m.line_ns(&c, Some(0), 0), c.line_local_ns);
        assert_eq!(m.line_ns(&c, Some(0), 128), c.line_smt_ns);
        assert_eq!(m.line_ns(&c, Some(0), 1), c.line_socket_ns);
        assert_eq!(m.line_ns(&c, Some(0), 64), c.line_remote_ns);
        assert!(Machine { sockets: 0, ..m }.validate().is_err());
    }
}
