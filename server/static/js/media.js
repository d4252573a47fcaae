// Camera and microphone: ask for them, fall back to what works, list the
// devices, and show the microphone's level.

export function webrtcSupported() {
  return Boolean(
    window.RTCPeerConnection && navigator.mediaDevices && navigator.mediaDevices.getUserMedia,
  );
}

function constraint(deviceId) {
  return deviceId ? { deviceId: { exact: deviceId } } : true;
}

// What went wrong with one kind of device, in a word the pages translate.
function problemOf(error) {
  if (!error) return null;
  if (error.name === "NotAllowedError" || error.name === "SecurityError") return "blocked";
  if (error.name === "NotFoundError" || error.name === "OverconstrainedError") return "missing";
  if (error.name === "NotReadableError" || error.name === "AbortError") return "busy";
  return "missing";
}

// Returns { stream, camera: problem|null, microphone: problem|null }. The
// stream holds whatever could be had: both, audio only, video only, or
// nothing (stream null).
export async function getMedia({ cameraId = null, microphoneId = null } = {}) {
  const media = navigator.mediaDevices;
  try {
    const stream = await media.getUserMedia({
      audio: constraint(microphoneId),
      video: constraint(cameraId),
    });
    return { stream, camera: null, microphone: null };
  } catch (both) {
    let audioError = null;
    let videoError = null;
    let audio = null;
    let video = null;
    try {
      audio = await media.getUserMedia({ audio: constraint(microphoneId) });
    } catch (error) {
      audioError = error;
    }
    try {
      video = await media.getUserMedia({ video: constraint(cameraId) });
    } catch (error) {
      videoError = error;
    }
    const tracks = [...(audio ? audio.getTracks() : []), ...(video ? video.getTracks() : [])];
    return {
      stream: tracks.length ? new MediaStream(tracks) : null,
      camera: video ? null : problemOf(videoError || both),
      microphone: audio ? null : problemOf(audioError || both),
    };
  }
}

export function stopStream(stream) {
  if (stream) for (const track of stream.getTracks()) track.stop();
}

export async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  return {
    cameras: devices.filter((d) => d.kind === "videoinput"),
    microphones: devices.filter((d) => d.kind === "audioinput"),
  };
}

// Fill a <select> with devices; the current one selected.
export function fillDeviceSelect(select, devices, currentId, fallbackLabel) {
  select.replaceChildren();
  devices.forEach((device, index) => {
    const option = document.createElement("option");
    option.value = device.deviceId;
    option.textContent = device.label || `${fallbackLabel} ${index + 1}`;
    option.selected = device.deviceId === currentId;
    select.append(option);
  });
  select.disabled = devices.length === 0;
}

export function trackDeviceId(stream, kind) {
  const track = stream && stream.getTracks().find((t) => t.kind === kind);
  return track ? track.getSettings().deviceId || null : null;
}

// Drive a <meter> with the microphone's loudness; returns a stop function.
export function showLevel(stream, meter) {
  const track = stream && stream.getAudioTracks()[0];
  if (!track || !window.AudioContext) {
    meter.value = 0;
    return () => {};
  }
  const context = new AudioContext();
  const source = context.createMediaStreamSource(new MediaStream([track]));
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  source.connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  let running = true;
  const tick = () => {
    if (!running) return;
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const sample of samples) sum += sample * sample;
    meter.value = Math.min(1, Math.sqrt(sum / samples.length) * 4);
    requestAnimationFrame(tick);
  };
  tick();
  return () => {
    // Called again after a Leave and a new device check: close once only
    // (a second close() rejects: "Cannot close a closed AudioContext").
    if (!running) return;
    running = false;
    context.close().catch(() => {});
  };
}

// A short two-tone chime (no sound file needed): the patient is waiting.
export function chime() {
  if (!window.AudioContext) return;
  const context = new AudioContext();
  const now = context.currentTime;
  [660, 880].forEach((frequency, index) => {
    const oscillator = context.createOscillator();
    const gain = context.createGain();
    oscillator.frequency.value = frequency;
    gain.gain.setValueAtTime(0.0001, now + index * 0.25);
    gain.gain.exponentialRampToValueAtTime(0.2, now + index * 0.25 + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, now + index * 0.25 + 0.4);
    oscillator.connect(gain).connect(context.destination);
    oscillator.start(now + index * 0.25);
    oscillator.stop(now + index * 0.25 + 0.45);
  });
  setTimeout(() => context.close(), 1200);
}

// Fill the camera and microphone <select>s, the stream's own devices chosen.
export async function showDevices(stream, cameraSelect, microphoneSelect, labels) {
  try {
    const { cameras, microphones } = await listDevices();
    fillDeviceSelect(cameraSelect, cameras, trackDeviceId(stream, "video"), labels.camera);
    fillDeviceSelect(microphoneSelect, microphones, trackDeviceId(stream, "audio"), labels.microphone);
  } catch {
    // Device names are a nicety; everything works without them.
  }
}
