"""The fleet benchmark's path, small: a few real agents in one worker process on a real
mosquitto, a campaign pushed to their group, every one active and nothing lost
(`python -m bench.campaigns` runs 60 and more)."""

from __future__ import annotations

from bench.campaigns import lost, measure


def test_a_campaign_pushed_to_a_group_runs_on_every_vehicle_and_nothing_is_lost() -> None:
    # measure() returns once every vehicle's check-in says the campaign is active; how
    # fast is the benchmark's business (bench.campaigns, GOAL_S), here a wide bound only.
    _, active, results = measure(agents=4, processes=1)
    assert sorted(r["vehicle"] for r in results) == [f"v{k:04d}" for k in range(4)]
    assert active < 60
    assert lost(results) == []
    assert all(r["frames_read"] > 0 and r["delivered"] > 0 for r in results)


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
