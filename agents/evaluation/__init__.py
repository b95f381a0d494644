"""The evaluation suite: policies x workload families x load levels x seeds, one engine run each,
then a tidy table, a summary with confidence intervals and plots.

Command line (Hydra, ``conf/evaluate.yaml`` + ``conf/suite/*.yaml``)::

    python scripts/evaluate.py                                   # suite=default: conf/suite/default.yaml
    python scripts/evaluate.py suite.policies=[fcfs,lpm,plas,program_fcfs] suite.workloads=[mapreduce,debate] \\
        suite.loads=[0.5,1.0,1.5] suite.seeds=[0,1,2] suite.jobs=2
    python scripts/evaluate.py suite.policies=[fcfs,ppo] +suite.agent_overrides.ppo.checkpoint=run/policy.zip

Python (what a train -> evaluate -> export job calls with a policy it just trained)::

    from servegym.agents.evaluation.api import SuiteConfig, evaluate, run_suite, summarise, to_markdown
    df = run_suite(SuiteConfig(policies=["fcfs", "plas"], workloads=["mapreduce"]),
                   extra_policies={"ppo": lambda: SB3Policy(...)})     # a factory per run
    print(to_markdown(summarise(df)))
    evaluate(SuiteConfig(...), out_dir="eval/")   # runs.csv, jobs.csv, summary.md, plots/*.png

Definitions
-----------
* **Policies** are names of ``conf/agent/*.yaml`` (each a ``_target_`` Policy class, built with
  Hydra's ``instantiate``, a fresh instance per run) or keys of ``extra_policies``.
* **Workloads** are names of ``conf/workload/*.yaml``; engine and cluster come from the same
  groups ``simulate.py`` uses (``engine=``, ``cluster=``).
* **Load** multiplies the workload's offered load: the open-loop ``arrival_rate`` (jobs/s) of a
  generated workload, the number of users of a closed loop (rounded, at least 1), or the replay
  speed of a trace (arrival times divided by the load). With the same seed the trees are the
  same at every load (the generator and the arrivals draw from separate seed streams), so loads
  of a workload differ only in when trees arrive.
* **Seeds** are workload seeds. Evaluation seeds are held out from training by range: training
  episodes and its periodic evaluations use seeds below 10000 (``train.eval_seeds`` 1000+), the
  suite defaults to 10000+ (``train.test_seeds``).
* **Unloaded time** of a tree: its completion time when it runs alone on an idle cluster of the
  same engine under FCFS (trees replayed one at a time, far apart, in one engine run, so shared
  system prompts may be warm in the prefix cache, as on a long-running server).
* **SLO** of a tree, in this order: ``slo_fixed_s`` seconds if set; else the tree's own
  ``slo_s`` if its workload declares one; else ``slo_scale`` x its unloaded time (default 5x).
  SLO attainment = trees done within their SLO / all trees; goodput = those trees / makespan
  (trees per second). Slowdown = tree time / unloaded time.
* **Confidence intervals**: 95% Student-t intervals over seeds (n - 1 degrees of freedom) of the
  per-run values, cut to the metric's range: every suite metric is a time, count, rate or
  fraction, so an interval never goes below 0 (and a fraction's never above 1); ``summary.csv``
  holds the symmetric half-width (``<m>_ci``) and the cut interval (``<m>_lo``, ``<m>_hi``).
  "JCT / FCFS" is the ratio of a policy's mean tree time to the baseline's in the same
  (workload, load) cell; its interval is a t-interval on the log scale of the per-seed ratios
  (paired: a seed gives both policies the same trees and arrivals), exponentiated back, so it is
  always > 0 and as wide below 1 as above (x/2 and x2 are equally far).
* **Traces** are suite members like generated workloads: ``suite.traces`` lists trace files (or
  mappings of ``TraceWorkload`` fields), each named after its file (its stem) or its ``name:``,
  so several traces share a suite; ``suite.workloads=[trace]`` with
  ``suite.workload_overrides.trace.path=...`` works too and is named after its file the same way.
  A trace with ``resample: none`` (the default) replays the same trees for every seed, so the
  suite runs it once per (policy, load), with the first seed: its cells have n = 1 and no
  interval (shown as —, and summary.md says why), rather than n identical runs and a zero-width
  interval that would look like certainty. ``resample: bootstrap`` makes seed s a resampled copy
  of the trace (``TraceWorkload`` defines it), and the suite runs every seed as for a generator.

Outputs (``evaluate`` / the script, into the Hydra run dir or ``output_dir=``, the only place
anything is written): ``runs.csv`` (one row per run: policy, workload, load, seed, every
metric), ``jobs.csv`` (one row per tree), ``kv_timeline.csv`` (KV use over time, binned),
``summary.csv`` and ``summary.md`` (mean and CI per cell), ``failures.csv`` / ``failures.log`` when a run raised, stalled or ran past
``suite.run_timeout_s``, ``plots/*.png``.

Interruption and resuming
-------------------------
A suite's folder holds one suite (``servegym.agents.evaluation.suite_io`` describes the files). Each run is
appended to ``runs.jsonl`` (with its trees and KV bins) and fsynced as it finishes, so Ctrl-C,
a crash or a killed job loses only the runs in flight; Ctrl-C prints one line (how many runs
were kept, where, how to continue) and the script exits 130. ``suite.resume=true`` with the same
``output_dir`` continues: runs already recorded are skipped, failed ones are run again, and a
suite config that differs from the recorded one is refused, naming the first differing key.
Tables and plots are written when the suite ends, each by temporary file and rename;
``report.json`` is removed first and written last, so a folder without it holds no complete
report. The folder must be empty (or absent) for a new suite: a folder with other files, or
another suite's, is refused (exit 2) rather than overwritten file by file, so old and new
tables never mix.

Scale
-----
``suite.jobs=N`` runs the runs of one suite in N worker processes (joblib/loky; results do not
depend on N). ``suite.backend=ray`` runs them as Ray tasks, one CPU each, on the cluster at
``suite.ray_address`` (or on a local instance of ``suite.jobs`` CPUs): one suite over many
machines, with the same rows, journal and resume (``ray_backend`` says what differs)::

    python scripts/evaluate.py suite.backend=ray suite.ray_address=HEAD_IP:6379 output_dir=eval/big

Or sweep one-cell suites with Hydra's multirun and merge the folders afterwards::

    python scripts/evaluate.py -m hydra/launcher=joblib suite.policies=[fcfs],[plas] suite.workloads=[mapreduce],[debate]
    python scripts/evaluate.py collect=multirun/2026-05-01/12-00-00     # one summary + plots of all
    # on SLURM (pip install hydra-submitit-launcher): the same sweep with
    python scripts/evaluate.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=cpu \\
        hydra.launcher.cpus_per_task=4 suite.jobs=4 suite.policies=[fcfs],[plas] ...

Modules, one concept each: ``api`` (the public names of the others, one import for callers;
this ``__init__`` imports nothing, so a submodule loads without the rest), ``config``
(``SuiteConfig`` and the Hydra plumbing that reads it), ``stats`` (intervals), ``load`` (a
workload at a load; unloaded times), ``runs`` (one run), ``plan`` (a checked suite's runs),
``results`` (tables from run records), ``summary`` (per-cell means and markdown), ``report`` (the
report folder), ``plots`` (its figures), ``suite`` (running a suite; ``evaluate``),
``ray_backend`` (runs as Ray tasks), ``ray_loopback`` (a multi-node Ray cluster on 127.0.0.1 for
the tests and the backend benchmark), ``collect`` (merging folders), ``suite_io`` (the folder's
journal and atomic writes).
"""
