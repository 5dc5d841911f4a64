"""Length-grouped DPO micro-batches: the length column transformers' group_by_length sampler needs.

    train_sampling_strategy: group_by_length    # in a DPO recipe (length_column_name: length, the default)

TRL 1.16's DPOTrainer has no padding-free mode: its collator pads the chosen and the rejected
sequence of every pair in a micro-batch to the longest of them. transformers' `group_by_length`
(`LengthGroupedSampler`) puts pairs of similar length into the same micro-batch, but it must know
each pair's length, and TRL's tokenized pairs give it nothing to measure (there is no
`input_ids` column; the Trainer also drops every column the model does not take before it
builds the sampler). `LengthGroupedPairs`, mixed into the DPO trainer, adds the column after
TRL's tokenization, keeps it through the column filter, and seeds the sampler so every process
draws the same order.

How grouping still shuffles: `get_length_grouped_indices` draws a fresh random permutation of
the whole dataset every epoch, cuts it into megabatches of 50 x (micro-batch x accumulation)
pairs, and sorts only within each megabatch. Which pairs share a megabatch, and the order of
the megabatches, are random over the whole data; only the order inside one is by length.
What grouping cannot remove is the difference between a pair's own chosen and rejected lengths:
both are padded to the longer one in the same forward pass.
"""

from __future__ import annotations

LENGTH_STRATEGIES = ("group_by_length", "batch_rebalance")  # the samplers that read length_column_name


def pair_length(prompt_ids: list, chosen_ids: list, rejected_ids: list, max_length: int | None) -> int:
    """The padded width a pair needs in a micro-batch: prompt + the longer response, cut at max_length
    (the collator truncates each sequence to max_length before padding)."""
    n = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    return n if max_length is None else min(n, max_length)


def _lengths_batch(prompt_ids, chosen_ids, rejected_ids, name: str, max_length: int | None) -> dict:
    return {name: [pair_length(p, c, r, max_length) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]}


def add_length_column(dataset, args):
    """`dataset` (TRL-tokenized pairs) with `args.length_column_name` when the sampler reads it; as it is otherwise."""
    import datasets
    from trl.trainer.utils import global_then_local_main_first

    columns = set(dataset.column_names or ())
    if (
        args.train_sampling_strategy not in LENGTH_STRATEGIES
        or not isinstance(dataset, datasets.Dataset)
        or not {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns
    ):
        return dataset
    if args.length_column_name in columns:
        dataset = dataset.remove_columns(args.length_column_name)  # a source column of that name is not ours
    with global_then_local_main_first():  # one process writes the cache, as TRL's own maps
        return dataset.map(
            _lengths_batch,
            batched=True,
            input_columns=["prompt_ids", "chosen_ids", "rejected_ids"],
            fn_kwargs={"name": args.length_column_name, "max_length": args.max_length},
            num_proc=args.dataset_num_proc,
            desc="Measuring pair lengths",
        )


class LengthGroupedPairs:
    """Mixin for trl.DPOTrainer: a length column for `train_sampling_strategy: group_by_length`
    (or batch_rebalance), kept past `remove_unused_columns`, and a sampler seeded alike on every process."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return add_length_column(super()._prepare_dataset(dataset, processing_class, args, dataset_name), args)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        name = self.args.length_column_name
        if self.args.train_sampling_strategy in LENGTH_STRATEGIES and name not in self._signature_columns:
            self._signature_columns.append(name)  # the collator reads only its own keys and ignores it

    def _get_train_sampler(self, train_dataset=None):
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and sampler.generator is None:
            # Unseeded, it draws from each process's global RNG, which accelerate does not synchronise for
            # this sampler: processes could draw different permutations and train on overlapping pairs.
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler.generator = torch.Generator().manual_seed(seed)
        return sampler
