//! S3 request headers that name an object besides the one in the path: `x-amz-copy-source`
//! (CopyObject, UploadPartCopy) and `x-amz-rename-source` (RenameObject). Each is read into the
//! path-style path it names, so an agent's scope is checked against it by the one path rule.

use http::HeaderMap;

/// Headers whose value names a source object as `[/]bucket/key[?versionId=...]`.
pub const SOURCE_HEADERS: [&str; 2] = ["x-amz-copy-source", "x-amz-rename-source"];

/// What one source header names, in the request path's own terms.
#[derive(Debug, PartialEq, Eq)]
pub enum NamedSource {
    /// The path the source would have if the request addressed it (`/bucket/key` path-style,
    /// `/key` on a virtual-hosted bucket host), still percent-encoded as sent.
    Path(String),
    /// Something no path can stand for: an access point or Outposts ARN, another bucket than a
    /// virtual-hosted host's own, a value that is not text.
    Unreadable,
}

/// Every source the request names in a header, for a request sent to `host`.
pub fn named_sources<'a>(
    headers: &'a HeaderMap,
    host: &'a str,
) -> impl Iterator<Item = NamedSource> + 'a {
    SOURCE_HEADERS
        .iter()
        .flat_map(move |name| headers.get_all(*name).iter())
        .map(move |value| match value.to_str() {
            Ok(text) => source_path(text, virtual_hosted_bucket(host)),
            Err(_) => NamedSource::Unreadable,
        })
}

fn source_path(value: &str, host_bucket: Option<&str>) -> NamedSource {
    // `?versionId=` selects a version of the same object; the path is what is scoped.
    let value = value.split('?').next().unwrap_or("").trim();
    if value.is_empty() || value.starts_with("arn:") {
        return NamedSource::Unreadable;
    }
    let path = value.strip_prefix('/').unwrap_or(value);
    match host_bucket {
        None => NamedSource::Path(format!("/{path}")),
        Some(bucket) => match path.split_once('/') {
            Some((source_bucket, key)) if source_bucket == bucket => {
                NamedSource::Path(format!("/{key}"))
            }
            _ => NamedSource::Unreadable,
        },
    }
}

/// The bucket of a virtual-hosted S3 host (`bucket.s3.us-east-1.amazonaws.com`,
/// `my.bucket.s3-us-west-2.amazonaws.com`); `None` for path-style and other endpoints.
fn virtual_hosted_bucket(host: &str) -> Option<&str> {
    let at = [".s3.", ".s3-"]
        .iter()
        .filter_map(|marker| host.find(marker))
        .min()?;
    host.get(..at).filter(|bucket| !bucket.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(host: &str, values: &[&str]) -> Vec<NamedSource> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-amz-copy-source", value.parse().unwrap());
        }
        headers.append("x-amz-rename-source", "/b/renamed".parse().unwrap());
        named_sources(&headers, host).collect()
    }

    #[test]
    fn path_style_sources_read_as_paths() {
        let host = "s3.us-east-1.amazonaws.com";
        assert_eq!(
            sources(
                host,
                &[
                    "/b/private/x.txt",
                    "b/k%20y?versionId=3",
                    "arn:aws:s3:::accesspoint/a"
                ]
            ),
            [
                NamedSource::Path("/b/private/x.txt".into()),
                NamedSource::Path("/b/k%20y".into()),
                NamedSource::Unreadable,
                NamedSource::Path("/b/renamed".into()),
            ]
        );
    }

    #[test]
    fn virtual_hosted_sources_read_as_paths_in_their_own_bucket_only() {
        let host = "b.s3.us-east-1.amazonaws.com";
        assert_eq!(
            sources(host, &["/b/scratch/x", "other/scratch/x"]),
            [
                NamedSource::Path("/scratch/x".into()),
                NamedSource::Unreadable,
                NamedSource::Path("/renamed".into()),
            ]
        );
        assert_eq!(
            virtual_hosted_bucket("my.bucket.s3-us-west-2.amazonaws.com"),
            Some("my.bucket")
        );
        assert_eq!(virtual_hosted_bucket("s3.amazonaws.com"), None);
        assert_eq!(virtual_hosted_bucket("minio.internal"), None);
    }
}
