import pytest

from extractor.storage.listing import is_image_key, label_for_key, list_images
from extractor.storage.s3 import parse_s3_uri

from conftest import REGION, unique_bucket


@pytest.fixture
def bucket(s3_mock):
    name = unique_bucket()
    s3_mock.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    return name


def put(client, bucket, keys):
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")


def test_lists_every_page_and_labels_by_parent_folder(s3_mock, bucket):
    images = [f"Test/Apple Braeburn/r_{i}_100.jpg" for i in range(7)] + \
             [f"Test/Pêche été/{i}.JPEG" for i in range(5)] + ["Test/Kiwi/k.png"]
    put(s3_mock, bucket, images + ["Test/notes.txt", "Test/Kiwi/", "Test/Kiwi/thumbs.db"])
    calls = []
    s3_mock.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))

    listing = list_images(s3_mock, parse_s3_uri(f"s3://{bucket}/Test/"), page_size=3)

    assert len(calls) == 6  # 16 keys, 3 per page: the paginator really went through every page
    assert [r.key for r in listing.images] == sorted(images)
    labels = {r.key: r.label for r in listing.images}
    assert labels["Test/Apple Braeburn/r_0_100.jpg"] == "Apple Braeburn"
    assert labels["Test/Pêche été/3.JPEG"] == "Pêche été"
    assert labels["Test/Kiwi/k.png"] == "Kiwi"
    assert listing.skipped == 3


def test_prefix_is_a_folder_not_a_string_prefix(s3_mock, bucket):
    put(s3_mock, bucket, ["Test/Kiwi/a.jpg", "Test2/Kiwi/b.jpg"])
    listing = list_images(s3_mock, parse_s3_uri(f"s3://{bucket}/Test"))
    assert [r.key for r in listing.images] == ["Test/Kiwi/a.jpg"]


def test_empty_prefix_gives_an_empty_listing(s3_mock, bucket):
    listing = list_images(s3_mock, parse_s3_uri(f"s3://{bucket}/nothing/"))
    assert listing.images == [] and listing.skipped == 0


@pytest.mark.parametrize("key,expected", [
    ("a/b.jpg", True), ("a/b.JPG", True), ("a/b.jpeg", True), ("a/b.Png", True),
    ("a/b.gif", False), ("a/b.jpg.txt", False), ("a/", False)])
def test_image_extensions(key, expected):
    assert is_image_key(key) is expected


def test_label_of_a_root_key_is_empty():
    assert label_for_key("photo.jpg") == ""
    assert label_for_key("Training/Apple Red 1/0_100.jpg") == "Apple Red 1"


@pytest.mark.parametrize("uri", ["bucket/prefix", "s3://", "s3:///prefix", "http://x/y", ""])
def test_bad_uris_are_refused_with_what_was_received(uri):
    with pytest.raises(ValueError, match="s3://|bucket"):
        parse_s3_uri(uri)
