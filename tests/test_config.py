import pytest
import yaml

from pdso_ray.config import ConfigError, dump_yaml, load_config


def test_defaults_follow_design():
    cfg = load_config(overrides=["data.classes=50"])
    assert cfg.stages is None and cfg.seed == 0
    assert cfg.denoise.keep_ratio == 0.5 and cfg.denoise.epochs_f == 15 and cfg.denoise.epochs_g == 50
    assert cfg.purify.dist_quantile == 0.8 and cfg.purify.alpha == 2 and cfg.purify.topk == 50
    assert cfg.cluster.niter == 20
    assert cfg.pseudo_labels.refine.method == "spo" and cfg.pseudo_labels.refine.sigma is None  # swept
    assert cfg.pseudo_labels.threshold is None and cfg.predict.background == "argmax"
    assert cfg.predict.short_side == 256


@pytest.mark.parametrize("classes,expected", [(50, 0.41), (300, 0.40), (919, 0.37), (5, 0.41)])
def test_saliency_threshold_per_benchmark(classes, expected):
    assert load_config(overrides=[f"data.classes={classes}"]).saliency_threshold() == expected


def test_classes_are_required_and_fit_below_the_ignore_id():
    with pytest.raises(ConfigError, match="data.classes.*required"):
        load_config()
    with pytest.raises(ConfigError, match="data.classes=1000"):
        load_config(overrides=["data.classes=1000"])
    assert load_config(overrides=["data.classes=999"]).data.classes == 999


def test_a_section_seed_overrides_the_top_level_seed():
    cfg = load_config(overrides=["data.classes=5", "seed=7", "denoise.seed=3"])
    assert cfg.seed_for("denoise") == 3 and cfg.seed_for("cluster") == 7


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: s3://bkt/imagenet\n  classes: 919\ncluster:\n  niter: 5\n")
    cfg = load_config(str(path), ["cluster.niter=7", "stages=features,cluster",
                                  "denoise.lr=0.01", "models.dino.checkpoint=s3://w/dino.pth",
                                  "pseudo_labels.threshold=0.5", "denoise.keep_ratio=1"])
    assert cfg.data.root == "s3://bkt/imagenet" and cfg.data.classes == 919
    assert cfg.cluster.niter == 7
    assert cfg.stages == ["features", "cluster"]
    assert cfg.denoise.lr == 0.01 and cfg.denoise.keep_ratio == 1.0
    assert cfg.models.dino.checkpoint == "s3://w/dino.pth"
    assert cfg.pseudo_labels.threshold == 0.5


@pytest.mark.parametrize("override,needle", [
    ("cluster.niterr=3", "cluster.niterr"),              # unknown key, with a suggestion
    ("cluster.niter=abc", "cluster.niter='abc'"),         # wrong type
    ("cluster.niter=2.5", "cluster.niter=2.5"),
    ("features.batch_size=0", "features.batch_size=0"),  # out of range
    ("denoise.keep_ratio=1.5", "denoise.keep_ratio"),
    ("denoise.max_in_memory_gb=-1", "denoise.max_in_memory_gb=-1"),
    ("data.limit=0", "data.limit=0"),
    ("seed=-1", "seed=-1"),
    ("finetune.epochs=0", "finetune.epochs=0"),
    ("predict.short_side=0", "predict.short_side=0"),
    ("models.allow_random_init=maybe", "models.allow_random_init"),
    ("data=3", "data"),
    ("niter", "expected key=value"),
])
def test_override_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.classes=5", override])
    assert needle in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("stages=features,clustr", "'clustr': unknown (did you mean 'cluster'?)"),
    ("pseudo_labels.refine.method=crf", "pseudo_labels.refine.method='crf'"),
    ("models.dino.arch=vit_huge", "models.dino.arch='vit_huge'"),
    ("models.sam.arch=vit_x", "models.sam.arch='vit_x'"),
    ("finetune.backbone=resnet18", "finetune.backbone='resnet18'"),
    ("data.layout=flat", "data.layout='flat'"),
])
def test_choices_are_checked_against_the_registries(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.classes=5", override])
    assert needle in str(e.value)


def test_unknown_yaml_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  classes: 5\ndenoise:\n  keep_ration: 0.3\n")
    with pytest.raises(ConfigError, match=r"denoise\.keep_ration.*did you mean.*keep_ratio"):
        load_config(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found: /nope.yaml"):
        load_config("/nope.yaml")


def test_dump_redacts_secrets():
    cfg = load_config(overrides=["data.classes=5", "storage.s3.key=AKIAXXXX", "storage.s3.secret=sekret123",
                                 "storage.s3.endpoint_url=http://127.0.0.1:9"])
    text = dump_yaml(cfg)
    assert "AKIAXXXX" not in text and "sekret123" not in text
    back = yaml.safe_load(text)
    assert back["storage"]["s3"]["secret"] == "***"
    assert back["storage"]["s3"]["endpoint_url"] == "http://127.0.0.1:9"
    # the hash used for manifests doesn't depend on secrets
    other = load_config(overrides=["data.classes=5", "storage.s3.key=OTHER", "storage.s3.secret=other",
                                   "storage.s3.endpoint_url=http://127.0.0.1:9"])
    assert cfg.section_hash("storage") == other.section_hash("storage")
    assert cfg.section_hash("cluster") != load_config(overrides=["data.classes=5", "cluster.seed=3"]).section_hash("cluster")


def test_exponent_notation_reads_as_a_number():
    # YAML 1.1 parses 1e-4 (no dot) as a string; a float setting still accepts it
    cfg = load_config(overrides=["data.classes=5", "denoise.finetune_lr=1e-4", "denoise.lr=2E-3"])
    assert cfg.denoise.finetune_lr == pytest.approx(1e-4) and cfg.denoise.lr == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="denoise.lr='fast': expected a number"):
        load_config(overrides=["data.classes=5", "denoise.lr=fast"])


def test_output_format_is_checked_and_output_dot_format_is_its_alias():
    assert load_config(None, ["data.classes=2"]).output_format == "files"
    assert load_config(None, ["data.classes=2", "output.format=webdataset"]).output_format == "webdataset"
    with pytest.raises(ConfigError, match="output_format='tar': unknown; choose one of files, webdataset"):
        load_config(None, ["data.classes=2", "output_format=tar"])


def test_lightcluster_votes_are_checked_against_the_voters():
    from pdso_ray.stages.lightcluster import votes_needed

    cfg = load_config(overrides=["data.classes=5"])
    assert cfg.lightcluster.voters == ["image"] and votes_needed(cfg) == 1
    cfg = load_config(overrides=["data.classes=5", "lightcluster.voters=[dataset,category,image]"])
    assert votes_needed(cfg) == 2  # unset: a majority of the voters, the paper's consistency
    with pytest.raises(ConfigError, match="lightcluster.min_votes=2.*number of lightcluster.voters"):
        load_config(overrides=["data.classes=5", "lightcluster.min_votes=2"])
    with pytest.raises(ConfigError, match="lightcluster.voters"):
        load_config(overrides=["data.classes=5", "lightcluster.voters=[image,image]", "lightcluster.min_votes=1"])


def test_a_denoise_profile_sets_its_rules_unless_the_user_gives_them():
    from pdso_ray.config import DENOISE_PROFILES

    base = "data: {classes: 5, root: /data}\n"
    anchored = load_config(text=base)
    assert anchored.denoise.profile == "anchored"
    for key, value in DENOISE_PROFILES["anchored"].items():  # the dataclass defaults are anchored's
        section, leaf = key.split(".")
        assert getattr(getattr(anchored, section), leaf) == value
    paper = load_config(text=base + "denoise: {profile: paper}\n")
    assert (paper.denoise.space, paper.denoise.h_rows, paper.denoise.relabel, paper.purify.init,
            paper.denoise.finetune_blocks) == ("features", "s2", "g", "random", 99)
    # a key from the file or from --set wins over the profile
    mixed = load_config(text=base + "denoise: {profile: paper, h_rows: all}\n",
                        overrides=["denoise.finetune_blocks=0"])
    assert (mixed.denoise.h_rows, mixed.denoise.finetune_blocks, mixed.denoise.space) == ("all", 0, "features")
    plain = load_config(text=base, overrides=["denoise.profile=plain"])
    assert (plain.denoise.dff, plain.denoise.space, plain.purify.filter) == (False, "features", False)
    # precomputed features have no backbone to fine-tune: the paper's other rules still apply
    on_features = load_config(text="data: {classes: 5, root: /data, features: /f}\ndenoise: {profile: paper}\n")
    assert (on_features.denoise.finetune_blocks, on_features.denoise.space) == (0, "features")


def test_denoise_rules_that_cannot_go_together_are_refused_by_name():
    base = "data: {classes: 5, root: /data}\n"
    with pytest.raises(ConfigError, match="denoise.dff=False: false needs denoise.space=features"):
        load_config(text=base, overrides=["denoise.dff=false"])
    with pytest.raises(ConfigError, match="denoise.prototypes='weights': weights needs denoise.space=embedding"):
        load_config(text=base, overrides=["denoise.space=features"])
    with pytest.raises(ConfigError, match="denoise.finetune_blocks=2: needs denoise.dff=true"):
        load_config(text=base, overrides=["denoise.profile=plain", "denoise.finetune_blocks=2"])
