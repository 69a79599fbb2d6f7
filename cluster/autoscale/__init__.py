"""The SLO-driven autoscaler: grows and shrinks the prefill and decode (or mixed) pools separately.

  observe.py     what a decision sees of each pool (plain data from heartbeats and the router)
  model.py       each pool's latency model, fitted online (TTFT from the prefill queue and rate;
                 ITL from the decode step's fit, by Little's law; calibrated against what is observed)
  policy.py      `decide(observations, state, config, slo) -> Decision`: a pure function, each decision
                 with its reason
  sim.py         replays a load trace through the policy against a model of the pools
  actuator.py    carries decisions out on Ray: placement groups and actors, drains, role flips
  controller.py  the loop: observe every `interval_s`, decide, act (or, in advisory mode, only report)
"""
