"""extractor.deploy.instances: executor layouts that fill the nodes, and the cost per million images."""

import pytest

from extractor.deploy import instances
from extractor.deploy.instances import container_mb, instance_type, plan


def test_instance_shapes_follow_the_family_and_size():
    m5 = instance_type("m5.4xlarge")
    assert (m5.vcpus, m5.memory_gib, m5.gpus, m5.yarn_mb) == (16, 64, 0, 57344)
    assert instance_type("m5.xlarge").yarn_mb == 12288  # EMR's published default for m5.xlarge
    g5 = instance_type("g5.12xlarge")
    assert (g5.vcpus, g5.gpus, g5.gpu_model) == (48, 4, "A10G")
    assert instance_type("g4dn.xlarge").compute_capability == (7, 5)
    assert instance_type("m7i.xlarge").amx and not instance_type("m5.xlarge").amx


@pytest.mark.parametrize("name,why", [("g5g.xlarge", "Arm CPUs"), ("g4ad.xlarge", "AMD GPUs"),
                                      ("m5.huge", "add its family"), ("x1e.xlarge", "add its family")])
def test_types_it_cannot_size_are_refused_with_the_reason(name, why):
    with pytest.raises(ValueError, match=why):
        instance_type(name)


def test_the_default_cluster_featurizes_on_at_least_80_percent_of_the_paid_vcpus():
    layout = plan("m5.xlarge", "m5.4xlarge", 2)
    driver = container_mb(10 * 1024)
    assert driver == 11264  # 10g + Spark's 10 % overhead
    size = layout.executor_memory_mb + layout.executor_overhead_mb
    # 4 executors beside the driver fill its node exactly; a 5th would not fit on the other node.
    assert driver + 4 * size <= 57344 < 5 * size
    assert (layout.on_driver_node, layout.per_node) == (4, [4])
    working, paid = layout.working_units()
    assert (working, paid) == (32, 36) and working / paid >= 0.8
    usd, busy_usd, rate = instances.cluster_cost(layout, "float32")
    assert busy_usd / usd >= 0.8 and rate == pytest.approx(2 * instances.RATES[("m5.4xlarge", "float32")].images_s)


def test_the_old_default_left_two_thirds_of_the_vcpus_waiting():
    layout = plan("m5.xlarge", "m5.xlarge", 2)
    assert layout.on_driver_node == 0 and layout.working_units() == (4, 12)


def test_gpu_task_nodes_get_one_executor_per_gpu_with_the_vcpus_of_that_gpu():
    layout = plan("m5.xlarge", "m5.xlarge", 1, "g5.12xlarge", 2, spot=True)
    assert layout.gpu and layout.executor_cores == 12  # 48 vCPUs / 4 GPUs: decoding for its GPU
    assert layout.per_node == [0, 4] and layout.working_units() == (8, 8)
    assert layout.executor_memory_mb + layout.executor_overhead_mb <= instance_type("g5.12xlarge").yarn_mb // 4


@pytest.mark.parametrize("args,message", [
    (("m5.xlarge", "m5.xlarge", 2, None, 0, True), "--spot puts task nodes on Spot"),
    (("m5.xlarge", "g5.xlarge", 1, "m5.xlarge", 2), "with CPU task nodes"),
    (("m5.xlarge", "g5.xlarge", 1, "g5.12xlarge", 1), "differ in vCPUs per GPU"),
    (("m5.xlarge", "c5.large", 2, None, 0, False, 2), "below the 5632 MiB one VGG16 worker needs"),
    (("m5.xlarge", "m5.xlarge", 0), "at least one core node"),
])
def test_clusters_that_cannot_work_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        plan(*args)


def test_executor_cores_beyond_the_node_are_refused():
    with pytest.raises(ValueError, match="--executor-cores 8 is more than m5.xlarge's 4 vCPUs"):
        plan("m5.xlarge", "m5.xlarge", 2, executor_cores=8)


def test_cost_per_million_is_price_over_images_per_hour():
    assert instances.eur_per_million(3.6, 1.0) == pytest.approx(3.6 * instances.EUR_PER_USD / 3600 * 1e6)
    rows = instances.cost_table()[2:]
    assert len(rows) == len(instances.RATES)
    for row, ((name, precision), rate) in zip(rows, instances.RATES.items()):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [name, precision, f"{rate.images_s:g}"]
        od, per_million, spot, spot_per_million = map(float, cells[4:])
        assert od == pytest.approx(instances.price_usd(name), abs=5e-4)
        assert per_million == pytest.approx(instances.eur_per_million(od, rate.images_s), rel=0.01)
        assert spot < od and spot_per_million < per_million


def test_spot_saves_on_ec2_but_not_on_the_emr_fee():
    base = instances.US_EAST_1_USD["g5.xlarge"]
    emr_fee = base * instances.EMR_FEE_SHARE
    assert instances.price_usd("g5.xlarge", spot=True) - emr_fee == pytest.approx(
        (instances.price_usd("g5.xlarge") - emr_fee) * instances.SPOT_SHARE)
    assert instances.price_usd("p5.48xlarge") is None


def test_layout_cli_prints_the_plan_and_refuses_in_one_line(capsys):
    assert instances.main(["layout", "--core-type", "m5.4xlarge", "--core-count", "2"]) == 0
    out = capsys.readouterr().out
    assert "featurizing: 32 of 36 paid vCPUs (89 %)" in out and "€ per million images" in out
    with pytest.raises(SystemExit) as exit_:
        instances.main(["layout", "--core-type", "m5.xlarge", "--core-count", "1", "--spot"])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_emr_documents_say_what_the_executors_run_on(tmp_path, capsys):
    from extractor.deploy import emr

    gpu = ["--core-type", "m5.xlarge", "--core-count", "1", "--task-type", "g5.xlarge", "--task-count", "2"]
    assert emr.main([str(tmp_path / "gpu"), "--code-prefix", "s3://b/c/", *gpu, "--", "--input", "s3://p/"]) == 0
    assert emr.main([str(tmp_path / "cpu"), "--code-prefix", "s3://b/c/", "--", "--input", "s3://p/"]) == 0
    assert (tmp_path / "gpu" / "node-kind").read_text() == "gpu\n"
    assert (tmp_path / "cpu" / "node-kind").read_text() == "cpu\n"
    assert "featurizing: 2 of 2 paid GPUs" in capsys.readouterr().err
