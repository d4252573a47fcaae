// The call engine shared by the therapist's and the patient's page: the
// signaling socket (docs/protocol.md) with reconnects and a heartbeat, and
// the RTCPeerConnection with trickle ICE, ICE restarts and quality figures.
//
// Who offers: the therapist, always (after peer-joined, after peer-rejoined,
// and after its own reconnect when the patient is there). An offer or answer
// from a peer that reloaded its page carries a new DTLS fingerprint; the
// side that sees one starts over with a new RTCPeerConnection.
//
// Media state: each side tells the other what its camera and microphone do
// ("media-state": on, off, missing, blocked, busy) before each offer or
// answer and at each change, so that a dark stage is explained, and the
// quality badge does not call a connection poor because nothing is sent.
//
// Recording: the server's "recording" messages are passed on to the page;
// at "starting" (sent only after the patient's consent) the engine opens a
// second connection to the recorder (recorder.js), and closes it at "off".
// It never opens one on its own: a page that reconnects or reloads follows
// the state the server tells it, and a stopped recording stays stopped.

import { failureDetail, qualityOf } from "./call_stats.js";
import { RecorderLink } from "./recorder.js";

const FINAL_CLOSE_CODES = new Map([
  [4001, "replaced"],
  [4002, "session-ended"],
  [4003, "denied"],
  [4004, "ended"],
]);
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];
const STATS_EVERY_MS = 2000;
// The recording's states in which a recorder connection may be open.
const RECORDER_STATES = new Set(["starting", "on"]);

export class LinkProblem extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function fingerprintOf(sdp) {
  const match = /^a=fingerprint:(.+)$/m.exec(sdp || "");
  return match ? match[1].trim() : null;
}

export class ConsultCall {
  // role: "therapist" | "patient"; socketUrl: async () => ws URL (a fresh
  // ticket for a patient; may throw LinkProblem); onEvent(type, detail).
  constructor({ role, socketUrl, onEvent }) {
    this.role = role;
    this.socketUrl = socketUrl;
    this.onEvent = onEvent;
    this.ws = null;
    this.pc = null;
    this.localStream = null;
    this.remoteStream = null;
    this.iceServers = [];
    this.remoteFingerprint = null;
    this.pendingCandidates = [];
    this.attempt = 0;
    this.finished = false;
    this.heartbeatMs = 20000;
    this.lastHeard = 0;
    this.timers = new Set();
    this.stats = { level: "unknown", bytesReceived: 0, bytesSent: 0, rttMs: null, loss: 0 };
    this.previousCounts = null;
    this.queue = Promise.resolve();
    this.recorder = null;
    this.recording = "off";
    this.peerMedia = null;
  }

  emit(type, detail = {}) {
    try {
      this.onEvent(type, detail);
    } catch (error) {
      console.error("event handler failed", type, error);
    }
  }

  later(ms, action) {
    const id = setTimeout(() => {
      this.timers.delete(id);
      action();
    }, ms);
    this.timers.add(id);
    return id;
  }

  // --- the socket -------------------------------------------------------

  async connect() {
    if (this.finished) return;
    let url;
    try {
      url = await this.socketUrl();
    } catch (error) {
      if (error instanceof LinkProblem) {
        this.finish("link-problem", { code: error.code, message: error.message });
        return;
      }
      this.retry();
      return;
    }
    if (this.finished) return;
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.addEventListener("message", (event) => {
      if (ws !== this.ws) return;
      this.lastHeard = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      // One message after another: an offer must be answered before the
      // candidates behind it are added.
      this.queue = this.queue
        .then(() => this.handle(message))
        .catch((error) => console.error("signaling", message.type, error));
    });
    ws.addEventListener("close", (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      const final = FINAL_CLOSE_CODES.get(event.code);
      if (final) {
        this.finish(final, { code: event.code });
      } else {
        this.retry();
      }
    });
  }

  retry() {
    if (this.finished) return;
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this.emit("reconnecting", { attempt: this.attempt });
    this.later(base / 2 + Math.random() * base, () => this.connect());
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ v: 1, ...message }));
      return true;
    }
    return false;
  }

  heartbeat() {
    if (this.finished) return;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      if (Date.now() - this.lastHeard > this.heartbeatMs * 2.5) {
        // Nothing heard for long: the connection is dead without knowing it
        // (a laptop lid, a network change). Drop it and reconnect.
        const dead = this.ws;
        this.ws = null;
        dead.close();
        this.retry();
      } else {
        this.send({ type: "ping" });
      }
    }
    this.later(this.heartbeatMs, () => this.heartbeat());
  }

  // --- messages ---------------------------------------------------------

  async handle(message) {
    switch (message.type) {
      case "welcome":
        this.attempt = 0;
        this.iceServers = message.ice_servers || [];
        if (!this.heartbeatStarted) {
          this.heartbeatStarted = true;
          this.heartbeatMs = Math.max(5, Math.min(message.heartbeat_s || 20, 60)) * 1000;
          this.later(this.heartbeatMs, () => this.heartbeat());
          this.later(STATS_EVERY_MS, () => this.collectStats());
        }
        this.followRecording(message.recording || "off", { live: false });
        this.emit("welcome", message);
        if (this.mediaProblems && (this.mediaProblems.camera || this.mediaProblems.microphone)) {
          this.report("media-error", {
            camera: this.mediaProblems.camera || null,
            microphone: this.mediaProblems.microphone || null,
          });
          this.mediaProblems = null;
        }
        if (this.role === "therapist" && message.state === "active" && message.peer_present) {
          await this.offer({ restart: Boolean(this.pc) });
        }
        break;
      case "peer-joined":
        this.emit(message.type, message);
        if (this.role === "therapist") await this.offer({ restart: false });
        break;
      case "peer-rejoined":
        this.emit(message.type, message);
        if (this.role === "therapist") await this.offer({ restart: Boolean(this.pc) });
        break;
      case "offer":
        if (this.role === "patient") await this.answerOffer(message.sdp);
        break;
      case "answer":
        if (this.role === "therapist") await this.acceptAnswer(message.sdp);
        break;
      case "candidate":
        await this.addCandidate(message);
        break;
      case "media-state":
        this.peerMedia = { camera: message.camera, microphone: message.microphone };
        this.emit("peer-media", this.peerMedia);
        break;
      case "consult-ended":
        this.finish("ended", { reason: message.reason });
        break;
      case "denied":
        this.finish("denied", {});
        break;
      case "replaced":
        this.finish("replaced", {});
        break;
      case "recording":
        // The question being answered, so that a late answer to an earlier
        // one is not taken for consent to this one.
        if (message.state === "requested") this.recordingRequest = message.request;
        this.followRecording(message.state, { live: true });
        this.emit("recording", message);
        break;
      case "recorder-answer":
        if (this.recorder) await this.recorder.accept(message.sdp);
        break;
      case "error":
        console.warn("signaling refused a message:", message.code, message.message);
        this.emit("protocol-error", message);
        break;
      case "pong":
        break;
      default:
        this.emit(message.type, message);
    }
  }

  // --- the peer connection ----------------------------------------------

  localTrack(kind) {
    return this.localStream ? this.localStream.getTracks().find((t) => t.kind === kind) : null;
  }

  // The offerer lays out one audio and one video transceiver; the answerer
  // gets its transceivers from the offer and puts its tracks on them.
  newPeerConnection({ offerer }) {
    if (this.pc) this.pc.close();
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pc = pc;
    this.remoteFingerprint = null;
    this.pendingCandidates = [];
    this.previousCounts = null;
    this.remoteStream = new MediaStream();
    if (offerer) {
      for (const kind of ["audio", "video"]) {
        const track = this.localTrack(kind);
        if (track) {
          pc.addTransceiver(track, { direction: "sendrecv", streams: [this.localStream] });
        } else {
          // No camera (or no microphone): still receive the other side's.
          pc.addTransceiver(kind, { direction: "recvonly" });
        }
      }
    }
    pc.addEventListener("track", (event) => {
      if (pc !== this.pc) return;
      this.remoteStream.addTrack(event.track);
      this.emit("remote-stream", { stream: this.remoteStream });
    });
    pc.addEventListener("icecandidate", (event) => {
      if (pc !== this.pc) return;
      const c = event.candidate;
      this.send({
        type: "candidate",
        candidate: c ? c.candidate : "",
        sdpMid: c ? c.sdpMid : null,
        sdpMLineIndex: c ? c.sdpMLineIndex : null,
      });
    });
    pc.addEventListener("iceconnectionstatechange", () => {
      if (pc === this.pc) this.report("ice-state", { state: pc.iceConnectionState });
    });
    pc.addEventListener("connectionstatechange", () => {
      if (pc !== this.pc) return;
      this.report("connection-state", { state: pc.connectionState });
      if (pc.connectionState === "failed") this.reportFailure(pc);
      this.emit("connection", { state: pc.connectionState });
      if (pc.connectionState === "failed" && this.role === "therapist") {
        this.offer({ restart: true }).catch((error) => console.error("ICE restart", error));
      }
    });
    this.emit("remote-stream", { stream: this.remoteStream });
    return pc;
  }

  async offer({ restart }) {
    const pc = restart && this.pc ? this.pc : this.newPeerConnection({ offerer: true });
    // The latest welcome brought fresh TURN credentials.
    if (restart) pc.setConfiguration({ iceServers: this.iceServers });
    const offer = await pc.createOffer({ iceRestart: restart });
    if (pc !== this.pc) return;
    await pc.setLocalDescription(offer);
    this.sendMediaState();
    this.send({ type: "offer", sdp: pc.localDescription.sdp });
  }

  async answerOffer(sdp) {
    const fingerprint = fingerprintOf(sdp);
    let pc = this.pc;
    if (!pc || fingerprint !== this.remoteFingerprint || pc.signalingState !== "stable") {
      pc = this.newPeerConnection({ offerer: false });
    } else {
      pc.setConfiguration({ iceServers: this.iceServers });
    }
    await pc.setRemoteDescription({ type: "offer", sdp });
    if (pc !== this.pc) return;
    this.remoteFingerprint = fingerprint;
    for (const transceiver of pc.getTransceivers()) {
      const kind = transceiver.receiver.track.kind;
      const track = this.localTrack(kind);
      if (track && transceiver.sender.track !== track) {
        await transceiver.sender.replaceTrack(track);
        transceiver.sender.setStreams(this.localStream);
      }
      transceiver.direction = track ? "sendrecv" : "recvonly";
    }
    await this.flushCandidates(pc);
    const answer = await pc.createAnswer();
    if (pc !== this.pc) return;
    await pc.setLocalDescription(answer);
    this.sendMediaState();
    this.send({ type: "answer", sdp: pc.localDescription.sdp });
  }

  async acceptAnswer(sdp) {
    const pc = this.pc;
    if (!pc || pc.signalingState !== "have-local-offer") return;
    const fingerprint = fingerprintOf(sdp);
    if (this.remoteFingerprint && fingerprint !== this.remoteFingerprint) {
      // The patient's page started over (a reload): so do we.
      await this.offer({ restart: false });
      return;
    }
    await pc.setRemoteDescription({ type: "answer", sdp });
    if (pc !== this.pc) return;
    this.remoteFingerprint = fingerprint;
    await this.flushCandidates(pc);
  }

  async addCandidate(message) {
    const candidate = {
      candidate: message.candidate,
      sdpMid: message.sdpMid,
      sdpMLineIndex: message.sdpMLineIndex,
    };
    if (!this.pc || !this.pc.remoteDescription) {
      this.pendingCandidates.push(candidate);
      return;
    }
    try {
      await this.pc.addIceCandidate(candidate);
    } catch (error) {
      // A candidate of a connection that was replaced meanwhile: harmless.
      console.debug("candidate not used", error.message);
    }
  }

  async flushCandidates(pc) {
    if (pc !== this.pc) return;
    const pending = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const candidate of pending) {
      try {
        await pc.addIceCandidate(candidate);
      } catch (error) {
        console.debug("candidate not used", error.message);
      }
    }
  }

  // --- media ------------------------------------------------------------

  // problems: { camera, microphone } as media.js names them ("blocked",
  // "missing", "busy" or null); reported once the socket is open.
  setLocalStream(stream, problems = {}) {
    this.localStream = stream;
    this.mediaProblems = problems;
    this.deviceProblems = { ...problems };
  }

  // What this side's camera and microphone do, as "media-state" says it.
  mediaState() {
    const state = {};
    for (const [kind, name] of [["video", "camera"], ["audio", "microphone"]]) {
      const track = this.localTrack(kind);
      const problem = (this.deviceProblems || {})[name];
      state[name] = track ? (track.enabled ? "on" : "off") : problem || "missing";
    }
    return state;
  }

  // Tell the other side (after a mute, a camera switched off or on); only
  // while a call is set up: every offer and answer is preceded by it anyway.
  sendMediaState() {
    if (this.pc) this.send({ type: "media-state", ...this.mediaState() });
  }

  // A diagnostic for the technical log (docs/protocol.md, "report"); never
  // anything personal: states, counts, candidate types, error names.
  report(event, detail) {
    this.send({ type: "report", event, detail });
  }

  async reportFailure(pc) {
    this.report("call-failed", await failureDetail(pc));
  }

  // Put another track (another camera or microphone, a shared screen) on
  // the wire without renegotiating.
  async replaceTrack(kind, track) {
    if (!this.pc) return false;
    const transceiver = this.pc
      .getTransceivers()
      .find((t) => t.receiver.track && t.receiver.track.kind === kind);
    // Without a track of this kind at the start, there is nothing to replace
    // (that would need a new negotiation).
    if (!transceiver || transceiver.direction === "recvonly") return false;
    await transceiver.sender.replaceTrack(track);
    return true;
  }

  async collectStats() {
    if (this.finished) return;
    this.later(STATS_EVERY_MS, () => this.collectStats());
    const pc = this.pc;
    if (!pc) return;
    let report;
    try {
      report = await pc.getStats();
    } catch {
      return;
    }
    const connected = pc.connectionState === "connected";
    const { stats, counts } = qualityOf(report, this.previousCounts, { connected, peerMedia: this.peerMedia });
    this.previousCounts = counts;
    this.stats = stats;
    this.emit("quality", this.stats);
  }

  // --- the recording ----------------------------------------------------

  requestRecording() { return this.send({ type: "record-request" }); }
  stopRecording() { return this.send({ type: "record-stop" }); }

  // by: "patient" or "guardian" (the invite says which the server needs).
  answerRecording(agree, by) {
    const answer = { type: "record-consent", agree, by };
    if (this.recordingRequest) answer.request = this.recordingRequest;
    return this.send(answer);
  }

  // The server's word on the recording. live: a change announced just now
  // (a "recording" message), not the state a welcome reports.
  followRecording(state, { live }) {
    this.recording = state;
    if (!RECORDER_STATES.has(state)) this.closeRecorder();
    else if (live && state === "starting" && !this.recorder) this.openRecorder();
  }

  openRecorder() {
    const tracks = { audio: this.localTrack("audio"), video: this.localTrack("video") };
    if (!tracks.audio) {
      // The recorder refuses a recording without sound: say so, stop it.
      this.report("media-error", { recorder: "no-microphone" });
      this.stopRecording();
      this.emit("recorder", { state: "no-microphone" });
      return;
    }
    const link = new RecorderLink({
      iceServers: this.iceServers,
      tracks,
      onState: (state) => {
        if (link !== this.recorder) return;
        this.report("connection-state", { link: "recorder", state });
        this.emit("recorder", { state });
      },
    });
    this.recorder = link;
    link
      .offer()
      .then((sdp) => {
        if (sdp && link === this.recorder) this.send({ type: "recorder-offer", sdp });
      })
      .catch((error) => {
        console.error("recorder offer", error);
        if (link === this.recorder) this.report("call-failed", { link: "recorder", error: String(error.name || "error") });
      });
  }

  closeRecorder() {
    if (!this.recorder) return;
    const link = this.recorder;
    this.recorder = null;
    link.close();
  }

  // Another camera or microphone for the recording (never a shared screen:
  // the recording shows the people, as they agreed to).
  async replaceRecorderTrack(kind, track) {
    if (this.recorder) await this.recorder.replaceTrack(kind, track);
  }

  // --- the end ----------------------------------------------------------

  admit() { return this.send({ type: "admit" }); }
  deny() { return this.send({ type: "deny" }); }
  end() { return this.send({ type: "end" }); }

  // Leave for good (no grace period): bye, then close.
  leave() {
    this.send({ type: "bye" });
    this.finish("left", {});
  }

  finish(kind, detail) {
    if (this.finished) return;
    this.finished = true;
    for (const id of this.timers) clearTimeout(id);
    this.timers.clear();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000);
    }
    if (this.pc) {
      this.pc.close();
      this.pc = null;
    }
    this.closeRecorder();
    this.emit(kind, detail);
  }
}
