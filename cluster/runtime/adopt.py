"""Detached instances (`detached_instances: true`): instances that outlive the API process that
launched them, and the next API process that takes them over.

  (1) names: each instance's actor and placement group is detached (Ray's GCS owns them, not the API's
      driver) and named `instance/<instance id>` in the cluster's Ray namespace
      (`ClusterConfig.ray_namespace`, which the API's driver joins): an API that crashes (SIGKILL, OOM)
      leaves them serving;
  (2) `find_instances`: an API that starts lists the named actors of its namespace and looks their
      placement groups up by the same name;
  (3) `adopt`: each is asked, once its group is placed, to forget what the dead API left on it
      (`InstanceActor.adopt`: its requests, whose clients went with that process, and its KV links,
      which the new router makes again) and answers its `info`: its id and its role (the actor's, which
      a role flip may have changed since its name was given). One that fails, or whose model or layout
      is not the new config's for its role, is released;
  (4) `remove_orphan_groups`: a named group whose actor is gone (it died while no API watched) is removed;
  (5) the launcher joins the adopted instances to the router and launches only what each pool still
      misses; a clean stop (SIGINT/SIGTERM, `ray job stop`) kills them and removes their groups like
      any other, so only a crash leaves them behind.
Requests in flight at the crash are lost with the API process (their clients' connections die with it).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cluster.types import Role

log = logging.getLogger(__name__)
PREFIX = "instance/"


def detached_name(instance_id: str) -> str:
    """The name of an instance's actor and of its placement group, in the cluster's Ray namespace."""
    return PREFIX + instance_id


@dataclass
class Found:
    """A named instance actor of this cluster's namespace, and its group (None if it has none left)."""

    instance_id: str
    actor: object
    group: object | None


def find_instances() -> list[Found]:
    """(2) The instance actors named in the driver's namespace (those Ray still lists: alive, or being
    (re)started)."""
    import ray
    from ray.util import get_placement_group

    found = []
    for name in sorted(ray.util.list_named_actors()):
        if not name.startswith(PREFIX):
            continue
        try:
            actor = ray.get_actor(name)
        except ValueError:  # gone since it was listed
            continue
        try:
            group = get_placement_group(name)
        except ValueError:
            group = None
        found.append(Found(name[len(PREFIX):], actor, group))
    return found


async def adopt(found: Found, fits) -> Role | None:
    """(3) The instance's role once it has forgotten the dead API's requests and links; None (and the
    instance released) if it does not answer, or `fits(role, engine_config)` refuses the engine config it
    was launched with (another model or layout: the config changed between the two API processes)."""
    try:
        if found.group is not None:
            await found.group.ready()
        info = await found.actor.adopt.remote()
        role = Role(info["role"])
        why = None if fits(role, info["engine_config"]) else f"its {role.value} engine is not this config's"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # its actor died, or its engine failed
        why = f"{type(exc).__name__}: {exc}"
    if why is None:
        return role
    log.warning("instance %s not adopted (%s): released", found.instance_id, why)
    release(found.actor, found.group)
    return None


def remove_orphan_groups(live_ids: set[str]) -> list[str]:
    """(4) Remove the named groups of this namespace whose instance is not among `live_ids`; returns
    their names."""
    import ray
    from ray.util import get_placement_group
    from ray.util.placement_group import remove_placement_group

    removed = []
    names = {g["name"] for g in ray.util.placement_group_table().values()
             if g["name"].startswith(PREFIX) and g["state"] != "REMOVED"}
    for name in sorted(names - {detached_name(i) for i in live_ids}):
        try:  # looked up in the driver's namespace: another cluster's group of that name is not found
            remove_placement_group(get_placement_group(name))
            removed.append(name)
        except ValueError:
            pass
    return removed


def release(actor, group) -> None:
    """Kill an instance's actor and remove its placement group (either may be None, or gone already)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        if actor is not None:
            ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass
    try:
        if group is not None:
            remove_placement_group(group)
    except Exception:  # already removed
        pass
