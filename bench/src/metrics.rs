//! Reading the target's Prometheus metrics: mean sessions per batched target forward during a
//! pass, from the change in `specllava_verify_batch_size` (histogram sum and count).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The histogram the target records per batched forward.
pub const BATCH_SIZE_METRIC: &str = "specllava_verify_batch_size";

/// `(sum, count)` of a Prometheus histogram in text exposition format (series without labels,
/// or summed over label sets).
pub fn histogram_sum_count(text: &str, name: &str) -> Option<(f64, f64)> {
    let (mut sum, mut count, mut seen) = (0.0, 0.0, false);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut parts = line.split_whitespace();
        let (Some(series), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or(series);
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if metric == format!("{name}_sum") {
            sum += v;
            seen = true;
        } else if metric == format!("{name}_count") {
            count += v;
        }
    }
    seen.then_some((sum, count))
}

/// Mean of the observations between two scrapes.
pub fn mean_between(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let (s0, c0) = before.unwrap_or((0.0, 0.0));
    let (s1, c1) = after?;
    (c1 > c0).then(|| (s1 - s0) / (c1 - c0))
}

/// Fetches `http://host:port/path` (HTTP/1.0, no TLS) and returns the body.
pub async fn scrape(addr: &str, path: &str) -> std::io::Result<String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        Ok::<_, std::io::Error>(match text.split_once("\r\n\r\n") {
            Some((_, body)) => body.to_owned(),
            None => text,
        })
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "metrics scrape timed out")
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_histogram_sum_and_count() {
        let text = "# HELP specllava_verify_batch_size Sessions\n\
                    # TYPE specllava_verify_batch_size histogram\n\
                    specllava_verify_batch_size_sum 30.0\n\
                    specllava_verify_batch_size_count 10\n\
                    specllava_verify_batch_size_bucket{le=\"1.0\"} 2\n\
                    specllava_verify_batch_nodes_sum 999\n";
        assert_eq!(
            histogram_sum_count(text, BATCH_SIZE_METRIC),
            Some((30.0, 10.0))
        );
        assert_eq!(histogram_sum_count(text, "missing"), None);
        assert_eq!(
            mean_between(Some((30.0, 10.0)), Some((70.0, 20.0))),
            Some(4.0)
        );
        assert_eq!(mean_between(None, Some((8.0, 2.0))), Some(4.0));
        assert_eq!(mean_between(Some((8.0, 2.0)), Some((8.0, 2.0))), None);
    }
}
