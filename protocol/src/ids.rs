//! Newtype identifiers. Each wraps an integer and serializes as that integer.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A task, unique within one interchange (embedded run or daemon).
    TaskId(u64), "task-"
);
id_type!(
    /// The attempt number of a task's dispatch; starts at 1 and grows on every re-dispatch.
    /// Results carry it so that results of superseded attempts can be told apart and discarded.
    Attempt(u32), "attempt-"
);
id_type!(
    /// A registered manager, assigned by the interchange at registration; never reused.
    ManagerId(u64), "manager-"
);
id_type!(
    /// A block: one batch job (or one local group of managers) started by a provider.
    BlockId(u64), "block-"
);
id_type!(
    /// A worker slot inside one manager.
    WorkerId(u32), "worker-"
);
id_type!(
    /// A registered function.
    FunctionId(u64), "function-"
);

impl Attempt {
    /// The first attempt of every task.
    pub const FIRST: Attempt = Attempt(1);

    /// The attempt that supersedes this one.
    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }
}
