"""servegym environments: workloads, the engine, and (later) the Gymnasium envs over them."""
