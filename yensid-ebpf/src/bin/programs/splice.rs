//! `splice`: the stream_verdict program on the `SPLICED` SOCKHASH
//! (verdict-only mode, Linux >= 5.10).
//!
//! Every segment received on a spliced socket is sent out of its peer
//! socket without ever reaching userspace. The peer is found by socket
//! cookie. When a socket has no peer entry (being torn down), the bytes are
//! passed to the socket's own receive queue, where userspace forwards them:
//! nothing is ever dropped here.
//!
//! Both maps are pinned: a spliced pair keeps flowing while no daemon holds
//! it (its two descriptors in flight to a successor, or in systemd's file
//! descriptor store), and the next daemon finds the pair where it was.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use yensid_ebpf::maps::MAX_SPLICED_SOCKETS;

#[map]
static SPLICED: SockHash<u64> = SockHash::pinned(MAX_SPLICED_SOCKETS, 0);
#[map]
static PEERS: HashMap<u64, u64> = HashMap::pinned(MAX_SPLICED_SOCKETS, 0);

#[stream_verdict]
pub fn splice(ctx: SkBuffContext) -> u32 {
    // A FIN that arrives after every byte before it was redirected comes
    // as an skb without data. Redirected, the peer's send work would try
    // to send 0 bytes, take that for a broken pipe and fail the peer
    // socket with EPIPE while it still has data to deliver. Passed, it
    // marks this socket's own end of stream, which userspace watches.
    if ctx.len() == 0 {
        return SK_PASS;
    }
    // SAFETY: the helper only reads the skb's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    // SAFETY: plain hash lookup of a u64.
    let Some(&peer) = (unsafe { PEERS.get(&cookie) }) else {
        return SK_PASS;
    };
    // On success the skb is queued for the peer's egress. On failure (the
    // peer left the SOCKHASH) nothing is redirected and SK_PASS delivers the
    // bytes to this socket's own queue: returning the helper's SK_DROP would
    // lose them.
    SPLICED.redirect_skb(&ctx, peer, 0);
    SK_PASS
}
