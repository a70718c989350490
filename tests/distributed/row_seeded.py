"""A rollout generator whose samples do not depend on how prompts are split across processes.

The packed generator draws one random stream per call, so rank r of two processes samples
different tokens than one process does for the same rows. For the equivalence tests, this
wrapper generates each row on its own with a seed made of (prompt tokens, index within its
group, call number): the same rows get the same completions whatever the number of processes,
and what remains to compare is the distributed training itself.
"""

from __future__ import annotations

import zlib

from bitnet_rl.rollout.output import concat_rollouts


class RowSeeded:
    def __init__(self, inner, group_size: int) -> None:
        self.inner, self.group_size, self.calls = inner, group_size, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sync_from(self, model) -> None:
        self.inner.sync_from(model)

    def generate(self, input_ids, seed=None, **kwargs):
        parts = []
        for row, prompt in enumerate(input_ids):
            key = f"{list(prompt)}|{row % self.group_size}|{self.calls}".encode()
            parts.append(self.inner.generate([list(prompt)], seed=zlib.crc32(key), **kwargs))
        self.calls += 1
        return concat_rollouts(parts)


def patch(group_size: int) -> None:
    """Make `bitnet_rl.train.ppo` build its generators wrapped in `RowSeeded`."""
    import bitnet_rl.train.ppo as ppo

    make = ppo.make_generator
    ppo.make_generator = lambda *args, **kwargs: RowSeeded(make(*args, **kwargs), group_size)
