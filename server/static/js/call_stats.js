// What call.js reads from an RTCPeerConnection's statistics: the summary of
// a failed call for the technical log, and the level of the quality badge.

// The candidate pair, its candidates and bytes of a call that failed.
export async function failureDetail(pc) {
  const detail = { ice: pc.iceConnectionState, gathering: pc.iceGatheringState };
  try {
    const report = await pc.getStats();
    let pair = null;
    report.forEach((entry) => {
      if (entry.type === "candidate-pair" && (entry.nominated || entry.selected)) pair = entry;
    });
    if (pair) {
      const local = report.get(pair.localCandidateId);
      const remote = report.get(pair.remoteCandidateId);
      detail.pairState = pair.state;
      detail.local = local ? `${local.candidateType}/${local.protocol}` : null;
      detail.remote = remote ? `${remote.candidateType}/${remote.protocol}` : null;
      detail.bytesReceived = pair.bytesReceived || 0;
      detail.bytesSent = pair.bytesSent || 0;
    }
    let candidates = 0;
    report.forEach((entry) => {
      if (entry.type === "local-candidate") candidates += 1;
    });
    detail.localCandidates = candidates;
  } catch (error) {
    detail.statsError = String(error.name || "error");
  }
  return detail;
}

// The quality since the previous report: ``before`` is the counts that one
// returned (null at first), ``peerMedia`` what the other side said its camera
// and microphone do. Returns the figures for the badge and the counts to keep.
export function qualityOf(report, before, { connected, peerMedia }) {
  let bytesReceived = 0;
  let bytesSent = 0;
  let packetsReceived = 0;
  let packetsLost = 0;
  let rtt = null;
  let inboundStreams = 0;
  report.forEach((entry) => {
    if (entry.type === "inbound-rtp") {
      inboundStreams += 1;
      bytesReceived += entry.bytesReceived || 0;
      packetsReceived += entry.packetsReceived || 0;
      packetsLost += Math.max(0, entry.packetsLost || 0);
    } else if (entry.type === "outbound-rtp") {
      bytesSent += entry.bytesSent || 0;
    } else if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded") {
      if (typeof entry.currentRoundTripTime === "number") rtt = entry.currentRoundTripTime;
    }
  });
  const previous = before || { packetsReceived: 0, packetsLost: 0, bytesReceived: 0 };
  const received = packetsReceived - previous.packetsReceived;
  const lost = packetsLost - previous.packetsLost;
  const loss = received + lost > 0 ? lost / (received + lost) : 0;
  // Nothing to receive when the other side sends nothing (no camera and no
  // microphone): then the round trip alone says how the connection is.
  const peer = peerMedia;
  const peerSends = inboundStreams > 0 || !peer || [peer.camera, peer.microphone].some((s) => s === "on" || s === "off");
  let level = "unknown";
  if (connected) {
    if (bytesReceived === previous.bytesReceived && peerSends) level = "poor";
    else if (loss < 0.02 && (rtt === null || rtt < 0.3)) level = "good";
    else if (loss < 0.08 && (rtt === null || rtt < 0.6)) level = "fair";
    else level = "poor";
  }
  return {
    stats: { level, bytesReceived, bytesSent, rttMs: rtt === null ? null : rtt * 1000, loss },
    counts: { packetsReceived, packetsLost, bytesReceived },
  };
}
