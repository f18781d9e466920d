//! Where the stream runs for a command that needs it (`cutover`, `verify`): the sidecar of the
//! same config answering on `metrics.listen` (driven through its admin endpoint), or a
//! pipeline started in this process when none answers.
//!
//! Invariant: a stream started here is ended here (`drain` or `stop`); a sidecar's is left
//! running unless a drain ends it, and a drain given up on is cancelled.

use std::time::Duration;

use crate::config::Config;
use crate::hold::HoldControl;
use crate::lsn::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum StreamerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("{error}; {cancel}")]
    SidecarDrain {
        error: crate::admin::AdminError,
        cancel: String,
    },
    #[error("holding the stream at a consistent point: {0}")]
    Hold(String),
    /// An exact hold came too late: the stream had passed the point (take a new one).
    #[error("holding the stream at a consistent point: the stream had passed it already")]
    HoldPassed,
}

/// A hold being made (see `hold`), in this process or in the sidecar.
pub enum Hold {
    Sidecar(crate::admin::Endpoint),
    InProcess(HoldControl),
}

/// Where the stream runs: the sidecar answering on `metrics.listen`, or this process.
pub enum Streamer {
    Sidecar(crate::admin::Endpoint),
    InProcess(crate::pipeline::Handle),
}

impl Streamer {
    /// The running sidecar if one answers, else a pipeline started here.
    pub async fn find(config: &Config) -> Result<Streamer, StreamerError> {
        let sidecar = crate::admin::Endpoint::of(config)?;
        match sidecar.call("GET", "/status", Duration::from_secs(2)).await {
            Ok(_) => Ok(Streamer::Sidecar(sidecar)),
            Err(crate::admin::AdminError::Connect { .. }) => {
                let opts = crate::pipeline::RunOptions::default();
                Ok(Streamer::InProcess(
                    crate::pipeline::start(config.clone(), opts).await?,
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// (ready, lag in seconds).
    pub async fn status(&self) -> Result<(bool, f64), StreamerError> {
        match self {
            Streamer::InProcess(h) => Ok((h.shared.ready(), h.shared.lag_seconds())),
            Streamer::Sidecar(sidecar) => {
                let (_, body) = sidecar
                    .call("GET", "/status", Duration::from_secs(5))
                    .await?;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                Ok((
                    v["ready"].as_bool().unwrap_or(false),
                    v["lag_seconds"].as_f64().unwrap_or(f64::INFINITY),
                ))
            }
        }
    }

    /// Drains (to blue's WAL position now, past the fence) and ends the stream.
    pub async fn drain(self, timeout: Duration) -> Result<(), StreamerError> {
        match self {
            Streamer::Sidecar(sidecar) => {
                let Err(error) = crate::admin::request_drain(&sidecar, timeout).await else {
                    return Ok(());
                };
                // The fence is about to come off: a drain left pending would stop the sidecar
                // later, at whatever point it then reaches.
                let cancel = crate::admin::cancel_drain(&sidecar, Duration::from_secs(5)).await;
                Err(StreamerError::SidecarDrain {
                    error,
                    cancel: match cancel {
                        Ok(()) => "the sidecar's drain was cancelled and it keeps streaming".into(),
                        Err(e) => format!(
                            "cancelling the sidecar's drain failed too ({e}): if it is still running it stops once drained; start it again then"
                        ),
                    },
                })
            }
            Streamer::InProcess(h) => {
                let Ok(drained) = tokio::time::timeout(timeout, h.drain()).await else {
                    // The stream may be stuck on green (a lock, an outage): the fence comes off
                    // now, not once the stream manages to stop; it stops in the background.
                    h.shutdown();
                    tokio::spawn(async move {
                        let _ = h.wait().await;
                    });
                    return Err(crate::admin::AdminError::DrainTimeout(timeout).into());
                };
                h.shutdown();
                let ended = h.wait().await;
                match drained {
                    Err(message) => Err(StreamerError::Admin(crate::admin::AdminError::Refused {
                        status: "drain".into(),
                        body: message,
                    })),
                    Ok(_) => ended.map(|_| ()).map_err(Into::into),
                }
            }
        }
    }

    /// Ends a stream started here (after a refused pre-check).
    pub async fn stop(self) {
        if let Streamer::InProcess(h) = self {
            h.shutdown();
            let _ = h.wait().await;
        }
    }

    /// Asks the stream to hold at the first blue transaction committing at or after `from`
    /// (see `hold`; `exact`: `from` is the point itself).
    pub async fn hold(&self, from: Lsn, exact: bool) -> Result<Hold, StreamerError> {
        match self {
            Streamer::InProcess(h) => Ok(Hold::InProcess(h.hold(from, exact))),
            Streamer::Sidecar(sidecar) => {
                let path = format!("/hold?from={from}&exact={exact}");
                expect_ok(sidecar.call("POST", &path, Duration::from_secs(5)).await?)?;
                Ok(Hold::Sidecar(sidecar.clone()))
            }
        }
    }
}

impl Hold {
    /// The exact point: waits until the stream holds there.
    pub async fn at(&mut self, target: Lsn) -> Result<(), StreamerError> {
        let wait = crate::hold::HOLD_MAX;
        match self {
            Hold::InProcess(c) => c.hold_at(target, wait).await.map_err(|e| match e {
                crate::hold::Refusal::Passed(_) => StreamerError::HoldPassed,
                crate::hold::Refusal::Other(m) => StreamerError::Hold(m),
            }),
            Hold::Sidecar(sidecar) => {
                let path = format!("/hold?at={target}");
                let answer = sidecar
                    .call("POST", &path, wait + Duration::from_secs(5))
                    .await?;
                expect_ok(answer).map(|_| ())
            }
        }
    }

    /// Lets the stream go on; returns how long it held (seconds), when known.
    pub async fn release(self) -> Result<Option<f64>, StreamerError> {
        match self {
            Hold::InProcess(c) => Ok(Some(c.release().as_secs_f64())),
            Hold::Sidecar(sidecar) => {
                let answer = sidecar
                    .call("DELETE", "/hold", Duration::from_secs(5))
                    .await?;
                let body = expect_ok(answer)?;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                Ok(v["held_seconds"].as_f64())
            }
        }
    }
}

/// The body of a 200 answer; any other is the sidecar's refusal (410: the point was passed).
fn expect_ok((status, body): (u16, String)) -> Result<String, StreamerError> {
    match status {
        200 => Ok(body),
        410 => Err(StreamerError::HoldPassed),
        _ => Err(StreamerError::Hold(body.trim().to_string())),
    }
}
