//! What the server answers from for one snapshot: the [`Table`] (plain data: names, records,
//! conflicts, notes) and, built beside it from the table, every reply to a plain query in wire
//! form ([`Prebuilt`]). Built off the request path, swapped in whole.
//!
//! Module order, one way only: `table` (data) ← `respond` (decide and encode with hickory) ←
//! `wire` (prebuild with `respond`, answer without it) ← `answers` ← `server`, `app`.

use registry::Snapshot;

use crate::table::{Table, TableOptions};
use crate::wire::Prebuilt;

#[derive(Debug)]
pub struct Answers {
    pub table: Table,
    /// The replies of the fast path ([`crate::wire`]), prepared from `table`.
    pub prebuilt: Prebuilt,
}

impl Answers {
    pub fn build(snapshot: &Snapshot, options: &TableOptions) -> Answers {
        Answers::from_table(Table::build(snapshot, options))
    }

    pub fn from_table(table: Table) -> Answers {
        let prebuilt = Prebuilt::build(&table);
        Answers { table, prebuilt }
    }

    /// The snapshot version it was built from.
    pub fn version(&self) -> u64 {
        self.table.version
    }
}

impl Default for Answers {
    fn default() -> Self {
        Answers::from_table(Table::default())
    }
}
