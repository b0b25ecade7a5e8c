"""The URI policy and the address guard, decided on resolved addresses from a resolver stub.

No test here connects anywhere but 127.0.0.1: blocked addresses are refused before a socket is
opened, and the stub resolver maps made-up host names to the addresses under test.
"""

import os

import pytest

from pipeline.errors import ConfigError, ImageError
from pipeline.images.fetch import fetch_bytes
from pipeline.images.security import UriPolicy, safe_name


class StubResolver:
    """Answers for made-up host names, and a record of what was asked."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.answers[host]


@pytest.mark.parametrize("address", [
    "169.254.169.254", "10.1.2.3", "172.16.0.9", "192.168.1.1", "127.0.0.1", "0.0.0.0",
    "100.64.0.1", "::1", "fe80::1", "fd00::5", "::ffff:169.254.169.254", "224.0.0.1"])
def test_non_public_addresses_are_refused_before_connecting(address):
    resolver = StubResolver({"images.vendor.test": [address]})
    with pytest.raises(ImageError) as info:
        fetch_bytes("https://images.vendor.test/a.jpg", 1000, retries=0, resolver=resolver)
    assert info.value.error_type == "fetch_failed" and "not allowed" in info.value.message
    assert address in info.value.message and resolver.asked == ["images.vendor.test"]


def test_one_bad_address_among_good_ones_refuses_the_host():
    resolver = StubResolver({"cdn.vendor.test": ["93.184.215.14", "169.254.169.254"]})
    with pytest.raises(ImageError, match=r"169\.254\.169\.254"):
        fetch_bytes("https://cdn.vendor.test/a.jpg", 1000, retries=0, resolver=resolver)


def test_public_address_passes_the_guard():
    policy = UriPolicy()
    assert policy.safe_address("cdn.vendor.test", 443,
                               StubResolver({"cdn.vendor.test": ["93.184.215.14"]})) == "93.184.215.14"


def test_allowed_network_lets_the_fetch_reach_the_resolved_address(image_server, sample_images):
    """The host name exists only in the stub, so a successful fetch proves the connection went to
    the address the guard approved, not to a second lookup."""
    data = sample_images[0].read_bytes()
    image_server.routes["/a.jpg"] = ("bytes", data)
    policy = UriPolicy(schemes=("http",), allowed_networks=("127.0.0.0/8",))
    resolver = StubResolver({"images.vendor.test": ["127.0.0.1"]})
    got = fetch_bytes(image_server.url("/a.jpg", host="images.vendor.test"), 10**7, policy=policy,
                      resolver=resolver)
    assert got == data and resolver.asked == ["images.vendor.test"]


def test_redirects_are_checked_hop_by_hop(image_server):
    policy = UriPolicy(schemes=("http",), allowed_networks=("127.0.0.0/8",))
    resolver = StubResolver({"metadata.test": ["169.254.169.254"]})
    image_server.routes["/to-metadata"] = ("redirect", "http://metadata.test/latest/meta-data")
    image_server.routes["/to-file"] = ("redirect", "file:///etc/passwd")
    with pytest.raises(ImageError, match=r"169\.254\.169\.254"):
        fetch_bytes(image_server.url("/to-metadata"), 1000, retries=0, policy=policy, resolver=resolver)
    with pytest.raises(ImageError, match="redirect to a 'file' URL"):
        fetch_bytes(image_server.url("/to-file"), 1000, retries=0, policy=policy)
    assert image_server.hits == {"/to-metadata": 1, "/to-file": 1}


@pytest.mark.parametrize("target", ["s3://127.0.0.1:{port}/bucket/a.jpg",
                                    "gs://127.0.0.1:{port}/bucket/a.jpg"])
def test_a_redirect_to_an_object_store_url_is_never_followed(image_server, target):
    policy = UriPolicy(schemes=("http", "https", "s3", "gs"), allowed_networks=("127.0.0.0/8",))
    image_server.routes["/to-store"] = ("redirect", target.format(port=image_server.port))
    with pytest.raises(ImageError, match="only http\\(s\\) redirects"):
        fetch_bytes(image_server.url("/to-store"), 1000, retries=0, policy=policy)
    assert image_server.hits == {"/to-store": 1}  # the store URL was not requested over HTTP


def test_scheme_allow_list():
    with pytest.raises(ImageError, match="scheme 'http'"):
        UriPolicy().check_uri("http://images.vendor.test/a.jpg")
    with pytest.raises(ImageError, match="scheme 'ftp'"):
        UriPolicy().check_uri("ftp://images.vendor.test/a.jpg")
    with pytest.raises(ConfigError, match="gopher"):
        UriPolicy(schemes=("https", "gopher"))
    with pytest.raises(ConfigError, match="allowed-networks"):
        UriPolicy(allowed_networks=("not-a-network",))


def test_default_job_policy_keeps_local_images_inside_the_manifest_folder(tmp_path, sample_images):
    catalog = tmp_path / "catalog"
    (catalog / "images").mkdir(parents=True)
    (catalog / "images" / "a.jpg").write_bytes(sample_images[0].read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("not for vendors")
    os.symlink(secret, catalog / "images" / "link.jpg")
    policy = UriPolicy.from_options("file,s3,gs,https", "", "", str(catalog))

    policy.check_uri(str(catalog / "images" / "a.jpg"))
    policy.check_uri(f"file://{catalog}/images/a.jpg")
    policy.check_uri("s3://vendor-bucket/a.jpg")
    policy.check_uri("https://cdn.vendor.test/a.jpg")
    for escape in (str(secret), f"{catalog}/images/../../secret.txt", f"file://{secret}",
                   str(catalog / "images" / "link.jpg")):
        with pytest.raises(ImageError, match="outside the allowed prefixes"):
            policy.check_uri(escape)


def test_explicit_prefixes_restrict_every_scheme():
    policy = UriPolicy.from_options("s3,https", "s3://vendor-images/,https://cdn.vendor.test/img/",
                                    "", "/data/catalog")
    policy.check_uri("s3://vendor-images/x/a.jpg")
    policy.check_uri("https://CDN.vendor.test/img/a.jpg")
    for uri in ("s3://other-bucket/a.jpg", "s3://vendor-images-evil/a.jpg",
                "https://cdn.vendor.test/img/../private/a.jpg", "https://cdn.vendor.test.evil/img/a",
                "https://user:pw@cdn.vendor.test/img/a.jpg"):
        with pytest.raises(ImageError, match="not allowed"):
            policy.check_uri(uri)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".", "..", "-rf", "x" * 200, "a\\b"])
def test_names_from_options_cannot_leave_their_folder(bad):
    with pytest.raises(ConfigError, match="not a safe name"):
        safe_name(bad, "--run-id")
    assert safe_name("20261122T234512Z-1c9e0a", "--run-id") == "20261122T234512Z-1c9e0a"


def test_a_manifest_in_object_storage_cannot_point_at_local_files(tmp_path):
    policy = UriPolicy.from_options("file,s3,https", "", "", "s3://vendor-bucket/catalog")
    policy.check_uri("s3://vendor-bucket/catalog/images/a.jpg")
    for uri in ("/etc/passwd", "file:///etc/passwd", str(tmp_path)):
        with pytest.raises(ImageError, match="outside the allowed prefixes"):
            policy.check_uri(uri)


@pytest.mark.parametrize("uri", ["images/a\x00b.jpg", "/abs/a\x00b.jpg", "http://[::1/x.jpg",
                                 "https://[not-an-ip]/x.jpg"])
def test_a_malformed_uri_is_a_row_error_not_a_crash(uri, tmp_path):
    policy = UriPolicy.from_options("file,http,https,s3", "", "", str(tmp_path))
    with pytest.raises(ImageError) as caught:
        policy.check_uri(uri)
    assert caught.value.error_type == "fetch_failed"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_the_manifest_folder_is_an_error_row_not_a_hang(tmp_path):
    fifo = tmp_path / "image.jpg"
    os.mkfifo(fifo)  # no writer: a blocking open would wait forever
    policy = UriPolicy.from_options("file", "", "", str(tmp_path))
    with pytest.raises(ImageError, match="not a regular file") as caught:
        fetch_bytes(str(fifo), 1000, retries=0, policy=policy, timeout=1)
    assert caught.value.error_type == "fetch_failed"


def test_every_job_starts_from_the_nightly_jobs_policy(tmp_path):
    """The labelled-data jobs' policy is the nightly job's plus --dataset-root, and
    `--dataset-root ''` makes it the nightly job's exactly (docs/guarantees.md)."""
    from pipeline.config import EvaluateConfig, RecategorizeConfig, TrainConfig
    from pipeline.inference.engine import ImageSettings

    catalog = str(tmp_path / "catalog")

    def policy(cfg) -> UriPolicy:
        return ImageSettings.from_config(cfg, 64, catalog).policy

    nightly = policy(RecategorizeConfig())
    for job in (EvaluateConfig, TrainConfig):
        assert policy(job(dataset_root="")) == nightly
        widened = policy(job(dataset_root=str(tmp_path / "dataset")))
        assert set(widened.prefixes) == set(nightly.prefixes) | {str(tmp_path / "dataset")}
        widened.check_uri(str(tmp_path / "dataset" / "a.jpg"))
        with pytest.raises(ImageError, match="outside the allowed prefixes"):
            policy(job(dataset_root="")).check_uri(str(tmp_path / "dataset" / "a.jpg"))
