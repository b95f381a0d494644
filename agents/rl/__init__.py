"""Learning a policy: the training run (``train``, its typed ``train:`` and ``logger`` schema in
``configs``), the set network (``networks``), behaviour cloning (``pretrain``), the input-driven
baseline (``input_baseline``), a checkpoint as a Policy (``learned``), and the RLlib backend
(``rllib_module``, ``rllib_train``). Needs the ``train`` extra (torch, SB3, Hydra); import the
modules themselves, this package re-exports nothing."""
