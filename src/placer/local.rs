//! `LocalRunner` behind Fn's `Runner` contract: an in-process runner the
//! placer can offer calls to, answering exactly as its node would.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{Attempt, PlacedCall, Runner, RunnerError};
use crate::guest::{GuestRequest, full_body};
use crate::runner::{LocalRunner, RunnerCall, RunnerStatus, TryExec};

impl Runner for Arc<LocalRunner> {
    fn try_exec<'a>(&'a self, call: &'a PlacedCall) -> BoxFuture<'a, Result<Attempt, RunnerError>> {
        Box::pin(async move {
            let request = GuestRequest {
                method: call.method.clone(),
                path_and_query: call.path_and_query.clone(),
                headers: call.headers.clone(),
                body: full_body(call.body.clone()),
                authority: "localhost".into(),
                scheme: http::uri::Scheme::HTTP,
                remote_addr: None,
            };
            let outcome = LocalRunner::try_exec(
                self,
                RunnerCall {
                    function: call.function.clone(),
                    request,
                    options: call.options.clone(),
                    created: call.created,
                },
            )
            .await;
            Ok(match outcome {
                TryExec::Nack { reason, .. } => Attempt::Nack {
                    reason: reason.as_str().to_owned(),
                },
                committed => Attempt::Placed(crate::server::try_exec_response(committed, call.created).await),
            })
        })
    }

    fn status(&self) -> BoxFuture<'_, Result<RunnerStatus, RunnerError>> {
        Box::pin(async move { Ok(self.runner_status().await) })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            self.drain();
            Ok(())
        })
    }

    fn address(&self) -> &str {
        &self.config().address
    }
}
