"""The fleet benchmark's path, small: a few real agents in one worker process on a real
mosquitto, a campaign pushed to their group, every one active, its records at the cloud side
from every vehicle, and nothing lost (`python -m bench.campaigns` runs 60 and more)."""

from __future__ import annotations

from bench.campaigns import lost, measure


def test_a_campaign_pushed_to_a_group_runs_on_every_vehicle_and_nothing_is_lost() -> None:
    # measure() returns once every vehicle's check-in says the campaign is active; how
    # fast is the benchmark's business (bench.campaigns, GOAL_S), here a wide bound only.
    fleet = measure(agents=4, processes=1)
    vehicles = [f"v{k:04d}" for k in range(4)]
    assert sorted(r["vehicle"] for r in fleet.results) == vehicles
    assert fleet.active < 60
    assert lost(fleet.results) == []
    assert all(r["frames_read"] > 0 and r["delivered"] > 0 for r in fleet.results)
    # Each vehicle's campaign records came after it took the campaign, which was after
    # the push (the ctime's coarse clock may lag time.time() by a tick).
    assert sorted(fleet.arrived) == sorted(fleet.records) == vehicles
    for vehicle, came in fleet.records.items():
        assert came is not None, vehicle
        assert fleet.pushed - 0.02 < fleet.arrived[vehicle] < came + 0.02


def test_lost_names_what_an_agent_lost() -> None:
    fine = {
        "vehicle": "v1",
        "exit": 0,
        "frames_read": 100,
        "frames_through": 100,
        "batches": 3,
        "delivered": 3,
        "dropped": 0,
        "collect_errors": 0.0,
    }
    assert lost([fine]) == []
    assert lost([{**fine, "frames_through": 99}]) == ["v1: 100 read, 99 on"]
    assert len(lost([{**fine, "delivered": 2}])) == 1
    assert len(lost([{**fine, "dropped": 1}])) == 1
