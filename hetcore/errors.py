"""The two failures a command reports without a traceback (docs/interface.md, exit status)."""


class UsageError(Exception):
    """Bad usage or bad input: exit status 2, one line `error: ...` on stderr."""

    exit_code = 2


class TrainingDiverged(Exception):
    """Training produced a non-finite loss: exit status 1, the message names the epoch (and,
    in a mini-batch run, the batch)."""

    exit_code = 1

    def __init__(self, framework: str, epoch: int, loss: float, weights: bool = False,
                 batch: int | None = None, batches: int = 1, member: int | None = None):
        self.framework = framework
        self.epoch = epoch
        self.loss = loss
        self.batch = batch
        at = f"epoch {epoch}" if batch is None or batches == 1 else \
            f"epoch {epoch}, batch {batch} of {batches}"
        if member is not None:
            at = f"{at} of member {member}"
        what = (f"the update of {at} made the weights non-finite" if weights
                else f"loss is {loss} at {at}")
        super().__init__(f"{framework}: training diverged: {what}; try a smaller --lr")


class ProcessFailed(Exception):
    """One process of a run over several failed (lost its peers, or an error of its own):
    exit status 1, one line naming the process."""

    exit_code = 1
