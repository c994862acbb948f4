//! Cache fills that run at the origin's pace for HTTP/2 clients. pingora 0.9 writes a miss to an
//! HTTP/2 client inline, so its fill would wait on that client's flow-control window, and so would
//! every request coalesced on it. A miss from an HTTP/2 client is instead run as a subrequest,
//! whose writes pingora queues (as it does for HTTP/1), and its response is piped to the client.
//! Fills run on a thread of their own: on a worker, a fill would be one task among all the
//! readers it feeds, and go at the pace of one of them.

use std::any::Any;
use std::future::Future;
use std::sync::OnceLock;

use http::header::HOST;
use http::Version;
use log::debug;
use pingora::proxy::subrequest::pipe::{pipe_subrequest, InputBody, InputBodyType};
use pingora::proxy::subrequest::Ctx as SubrequestCtx;
use pingora::proxy::Session;

/// The runtime fills run on; `None` if its thread could not be started (fills then run on the
/// worker of their request).
fn fills() -> Option<&'static tokio::runtime::Runtime> {
    static FILLS: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    FILLS
        .get_or_init(|| {
            let built = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("mtls-edge-fills")
                .enable_all()
                .build();
            built
                .map_err(|e| log::warn!("fills run on the workers: no thread for them ({e})"))
                .ok()
        })
        .as_ref()
}

/// What a fill's subrequest carries from the request it serves: that request's decisions.
pub struct Order<D>(Option<D>);

/// The decisions a fill's subrequest was started with, taken out of its session (once).
pub fn take_order<D: Any + Send + Sync>(session: &mut Session) -> Option<D> {
    let user = session.subrequest_ctx.as_mut()?.user_ctx_mut()?;
    user.downcast_mut::<Order<D>>()?.0.take()
}

/// Whether this session is a fill's subrequest.
pub fn is_fill<D: Any + Send + Sync>(session: &Session) -> bool {
    let user = session.subrequest_ctx.as_ref().and_then(|c| c.user_ctx());
    user.is_some_and(|u| u.is::<Order<D>>())
}

/// Serves `session`'s request through a subrequest that carries `decided`, and pipes its response
/// to the client. Returns false, having done nothing, when pingora gave the session no way to
/// start one; otherwise the response is written (or the client is gone).
pub async fn serve<D: Any + Send + Sync>(session: &mut Session, decided: D) -> bool {
    let ctx = SubrequestCtx::builder()
        .user_ctx(Box::new(Order(Some(decided))))
        .build();
    // The subrequest reads its request as HTTP/1.1 text: for the time of the copy, the request
    // is in that form, with the authority as its Host.
    let req = session.req_header_mut();
    let version = req.version;
    req.set_version(Version::HTTP_11);
    let authority = req.uri.authority().map(|a| a.as_str().to_string());
    let add_host = !req.headers.contains_key(HOST) && authority.is_some();
    if let (true, Some(a)) = (add_host, authority) {
        let _ = req.insert_header(HOST, a);
    }
    let made = session
        .subrequest_spawner
        .as_ref()
        .map(|s| s.create_subrequest(session.as_downstream(), ctx));
    let req = session.req_header_mut();
    req.set_version(version);
    if add_host {
        req.remove_header(&HOST);
    }
    let Some((subrequest, handle)) = made else {
        return false;
    };
    let pipe = pipe_subrequest(
        session,
        subrequest,
        handle,
        |t| Ok(Some(t)),
        InputBodyType::Preset(InputBody::NoBody),
    );
    // The pipe spawns the subrequest on the runtime it is polled in: the fills' one.
    let mut pipe = std::pin::pin!(pipe);
    let piped = std::future::poll_fn(|cx| {
        let _fills = fills().map(|rt| rt.enter());
        pipe.as_mut().poll(cx)
    })
    .await;
    let state = match piped {
        Ok(state) => state,
        Err(e) => {
            debug!("a fill's response did not reach its client: {}", e.error);
            e.state
        }
    };
    // The fill goes on without its client: what it still writes is read and dropped.
    if let Some(mut rx) = state.pipe_rx {
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
    }
    true
}
