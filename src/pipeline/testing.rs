//! A destination for unit tests of the pipeline's bookkeeping: it holds no rows, only
//! counts them, and records what each commit carried.

use std::future::Future;

use super::{
    ColumnDef, Committed, Destination, PipelineError, ProgressRecord, ProgressState, TxnMeta,
};

/// Counts the rows in its batch, and what each commit carried.
#[derive(Default)]
pub(crate) struct Counting {
    pending: usize,
    /// Rows spilled into the open commit.
    spilled: usize,
    /// Per commit: the rows it carried, and the progress state it recorded.
    pub(crate) committed: Vec<(usize, ProgressState)>,
}

impl Destination for Counting {
    const STAGE: &'static str = "test";
    async fn read_progress(&mut self, _: &str) -> Result<Option<ProgressRecord>, PipelineError> {
        Ok(None)
    }
    fn set_columns(&mut self, _: usize, _: &[ColumnDef]) -> Result<(), PipelineError> {
        Ok(())
    }
    fn begin_txn(&mut self, _: TxnMeta) {}
    fn row(&mut self, _: usize, _: &[Option<&[u8]>]) {
        self.pending += 1;
    }
    fn end_txn(&mut self) {}
    fn discard_txn(&mut self) {}
    fn batch_size(&self) -> (usize, usize) {
        (self.pending, 0)
    }
    fn spill(&mut self) -> impl Future<Output = Result<(), PipelineError>> + Send + 'static {
        self.spilled += std::mem::take(&mut self.pending);
        std::future::ready(Ok(()))
    }
    fn clear(&mut self) {
        self.pending = 0;
        self.spilled = 0;
    }
    fn commit(
        &mut self,
        _: &str,
        progress: &ProgressRecord,
    ) -> impl Future<Output = Result<Committed, PipelineError>> + Send + 'static {
        let rows = std::mem::take(&mut self.pending) + std::mem::take(&mut self.spilled);
        self.committed.push((rows, progress.state));
        std::future::ready(Ok(Committed::DURABLE))
    }
}
