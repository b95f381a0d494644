"""Routing-v0: the agent picks the replica of each call that becomes ready."""

from __future__ import annotations

from servegym.envs.engine.config import ClusterConfig
from servegym.envs.serving_env import RowChoiceEnv
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload


def routing_cluster() -> ClusterConfig:
    """conf/cluster/hetero.yaml: two llama8b_h100 replicas and one llama70b_h100x4, 2 ms apart.
    Routing matters here: on ``routing_workload`` the mean tree time is ~8.5 s round-robin,
    ~8.9 s all to replica 0, ~7.8 s random, ~6.3 s Llumnix's freeness and ~6.5 s Autellix's
    locality balancer (two seeds each); on four identical replicas the same heuristics lie
    within 4% of each other (except all-to-one)."""
    return ClusterConfig(replicas=["llama8b_h100", "llama8b_h100", "llama70b_h100x4"], network_delay_s=0.002)


def routing_workload() -> Workload:
    """Map-reduce trees (4 workers, 1024-token shared system prompt) at 6 jobs/s, 40 per
    episode: ~240 ROUTE decisions (one per call) per episode."""
    generator = MapReduce(
        system_tokens=1024,
        input_tokens_mean=512.0,
        tool_tokens_mean=256.0,
        output_tokens_mean=150.0,
        max_tokens=512,
    )
    return Workload(generator=generator, arrival_rate=6.0, num_jobs=40)


class RoutingEnv(RowChoiceEnv):
    """Which replica of a (heterogeneous) cluster serves each call of agent trees.

    ## Description
    Each step is one ROUTE decision: a call became ready (its parents finished and their tools
    returned) and more than one replica may serve it. Admission order and preemption victims
    on each replica are made by ``fallback`` (FCFS, newest preempted). The default cluster is
    heterogeneous (``routing_cluster``: two 8B replicas and one 70B replica), where a router
    that ignores speed and load loses ~30% of mean tree time to the best heuristic.

    ## Action space
    ``Discrete(R)``: the replica. ``action_masks()`` gives the eligible replicas (those that
    serve the call's model and whose KV cache can hold it). An invalid action (an ineligible
    replica, or an integer outside ``[0, R)``) is answered by the fallback's choice
    (round-robin over eligible replicas) and flagged ``info["invalid_action"] = True``; an
    action that is not one integer raises ``ValueError``.

    ## Observation space
    ``Dict``: ``global`` (G + kinds,): the global features and the kind one-hot, with only the
    cluster-wide columns filled (``time_s``, ``live_trees_log``: a ROUTE decision has no
    deciding replica); ``replicas`` (R, len(ROUTE_FEATURES)): one row of ``ROUTE_FEATURES`` per
    replica (its load, KV, cached prefix of this call, model size, tree locality, and the
    call's prompt length and role); ``mask`` (R,): 1 for eligible replicas.

    ## Rewards
    As Scheduling-v0: the return is minus the total tree completion time over ``time_scale_s``.

    ## Episode end
    As Scheduling-v0 (an episode with no ROUTE decision ends at its first step).

    ## Arguments
    As Scheduling-v0; ``env.decisions`` must be None or ``("route",)``; ``max_candidates`` is
    unused (the cluster fixes R).

    ## Version history
    v0: ROUTE as a masked discrete choice.
    """

    allowed_decisions = ("route",)
    default_decisions = ("route",)
    layout = ("replicas",)

    def _num_slots(self) -> int:
        return self.num_replicas

    def default_workload(self) -> Workload:
        return routing_workload()

    def default_cluster(self) -> ClusterConfig:
        return routing_cluster()
